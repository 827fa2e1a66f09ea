//! Django's routes: the `urlpatterns` of the `ROOT_URLCONF` its settings name, `path()`,
//! `re_path()` (and the old `url()`), and `include()` of other urlconfs (by module name, by
//! imported module, or an inline list), joined as Django joins them for
//! `request.resolver_match.route`: route strings concatenated, an included regex losing its `^`.

use super::{
    mounts::Scanned,
    python::{Module, imports, resolve, tokenize},
    syntax::{Arg, Call, Token, calls},
};

/// The string assigned to `NAME = "..."` at the top level of a module (`ROOT_URLCONF`).
pub fn assigned_string(module: &Module, name: &str) -> Option<String> {
    let tokens = tokenize(&module.source);
    tokens
        .split(|token| *token == Token::Newline)
        .find_map(|statement| match statement {
            [
                Token::Name(assigned),
                Token::Punct('='),
                Token::Str(Some(value)),
            ] if assigned == name => Some(value.clone()),
            _ => None,
        })
}

/// The settings module `manage.py` or `wsgi.py`/`asgi.py` default to:
/// `os.environ.setdefault("DJANGO_SETTINGS_MODULE", "mysite.settings")`.
pub fn default_settings_module(module: &Module) -> Option<String> {
    let tokens = tokenize(&module.source);
    calls(&tokens).into_iter().find_map(|call| {
        let is_setdefault = call.callee.last().is_some_and(|last| last == "setdefault");
        match (is_setdefault, call.positional.as_slice()) {
            (true, [Arg::Literal(key), Arg::Literal(value)]) if key == "DJANGO_SETTINGS_MODULE" => {
                Some(value.clone())
            }
            _ => None,
        }
    })
}

/// A route declaration of a urlconf.
struct Pattern {
    route: String,
    is_regex: bool,
    /// What it includes: another urlconf module, or the patterns inline in it.
    includes: Option<Included>,
    tokens: std::ops::Range<usize>,
}

enum Included {
    Module(String),
    Inline,
    Computed,
}

fn is_pattern_call(call: &Call) -> bool {
    matches!(
        call.callee.last().map(String::as_str),
        Some("path" | "re_path" | "url")
    ) && call.callee.len() <= 2
}

/// The urlconf modules a module includes by name (`include("blog.urls")`).
pub fn included_modules(module: &Module) -> Vec<String> {
    let tokens = tokenize(&module.source);
    let imports = imports(&tokens, module.package());
    calls(&tokens)
        .iter()
        .filter(|call| call.callee.last().is_some_and(|last| last == "include"))
        .filter_map(|call| match call.positional.first()? {
            Arg::Literal(name) => Some(name.clone()),
            Arg::Reference(reference) => {
                let (module, name) = resolve(reference, &module.name, &imports);
                Some(format!("{module}.{name}"))
            }
            Arg::Computed => None,
        })
        .collect()
}

/// The patterns of a urlconf with, for each, the patterns nested in it (inline includes).
fn patterns(module: &Module) -> (Vec<Pattern>, Vec<String>) {
    let tokens = tokenize(&module.source);
    let imports = imports(&tokens, module.package());
    let all = calls(&tokens);
    let mut unresolved = Vec::new();
    let mut found = Vec::new();
    for call in all.iter().filter(|call| is_pattern_call(call)) {
        let route = match call.arg(0, "route") {
            Some(Arg::Literal(route)) => route.clone(),
            _ => {
                unresolved.push(format!(
                    "{}: {}(...) (computed route)",
                    module.name,
                    call.callee.join(".")
                ));
                continue;
            }
        };
        let include = all.iter().find(|inner| {
            inner.callee.last().is_some_and(|last| last == "include")
                && call.tokens.start < inner.tokens.start
                && inner.tokens.end <= call.tokens.end
        });
        let includes = include.map(|include| match include.positional.first() {
            Some(Arg::Literal(name)) => Included::Module(name.clone()),
            Some(Arg::Reference(reference)) => {
                let (module_name, name) = resolve(reference, &module.name, &imports);
                Included::Module(format!("{module_name}.{name}"))
            }
            _ if tokens.get(include.tokens.start + 2) == Some(&Token::Punct('[')) => {
                Included::Inline
            }
            _ => Included::Computed,
        });
        found.push(Pattern {
            route,
            is_regex: call.callee.last().is_some_and(|last| last != "path"),
            includes,
            tokens: call.tokens.clone(),
        });
    }
    (found, unresolved)
}

/// Django's `_join_route`: an included regex drops its `^`.
fn join(prefix: &str, route: &str, is_regex: bool) -> String {
    let route = if is_regex && !prefix.is_empty() {
        route.strip_prefix('^').unwrap_or(route)
    } else {
        route
    };
    format!("{prefix}{route}")
}

/// The templates reachable from `root_urlconf`: `path()` chains in `templates`, chains with a
/// `re_path()` in `regex_templates`.
pub fn scan(modules: &[Module], root_urlconf: &str) -> Scanned {
    let mut scanned = Scanned::default();
    // (module, the tokens whose patterns apply (an inline include), prefix, whether the prefix
    // has path() converters and re_path() routes, depth)
    type Scope = (
        String,
        Option<std::ops::Range<usize>>,
        String,
        (bool, bool),
        usize,
    );
    let mut pending: Vec<Scope> = vec![(
        root_urlconf.to_owned(),
        None,
        String::new(),
        (false, false),
        0,
    )];
    while let Some((name, within, prefix, (has_path, has_regex), depth)) = pending.pop() {
        if depth > 16 {
            scanned
                .unresolved
                .push(format!("{name}: includes nested too deep"));
            continue;
        }
        let Some(module) = modules.iter().find(|module| module.name == name) else {
            scanned
                .unresolved
                .push(format!("{name}: urlconf not found"));
            continue;
        };
        let (patterns, unresolved) = patterns(module);
        scanned.unresolved.extend(unresolved);
        let in_range = |outer: &std::ops::Range<usize>, pattern: &Pattern| {
            outer.start < pattern.tokens.start && pattern.tokens.end <= outer.end
        };
        let in_scope: Vec<&Pattern> = patterns
            .iter()
            .filter(|pattern| within.as_ref().is_none_or(|range| in_range(range, pattern)))
            .collect();
        for pattern in &in_scope {
            // Nested in another pattern of this scope: that pattern's include reaches it.
            if in_scope
                .iter()
                .any(|outer| in_range(&outer.tokens, pattern))
            {
                continue;
            }
            let joined = join(&prefix, &pattern.route, pattern.is_regex);
            let kinds = (
                // A path() route without converters is literal text, in a regex as well.
                has_path || (!pattern.is_regex && pattern.route.contains('<')),
                has_regex || pattern.is_regex,
            );
            match &pattern.includes {
                None => match kinds {
                    (true, true) => scanned.unresolved.push(format!(
                        "{name}: {joined} mixes path() and re_path() routes"
                    )),
                    (_, true) => scanned.regex_templates.push(joined),
                    _ => scanned.templates.push(joined),
                },
                Some(Included::Module(included)) => {
                    pending.push((included.clone(), None, joined, kinds, depth + 1));
                }
                Some(Included::Inline) => pending.push((
                    name.clone(),
                    Some(pattern.tokens.clone()),
                    joined,
                    kinds,
                    depth + 1,
                )),
                Some(Included::Computed) => scanned
                    .unresolved
                    .push(format!("{name}: include() under {joined:?} (computed)")),
            }
        }
    }
    scanned.templates.sort();
    scanned.templates.dedup();
    scanned.regex_templates.sort();
    scanned.regex_templates.dedup();
    scanned.unresolved.sort();
    scanned.unresolved.dedup();
    scanned
}

#[cfg(test)]
mod tests {
    use super::*;

    fn module(name: &str, source: &str) -> Module {
        Module {
            name: name.into(),
            is_package: false,
            source: source.into(),
        }
    }

    #[test]
    fn settings_and_root_urlconf_are_found() {
        let manage = module(
            "manage",
            "import os, sys\n\ndef main():\n    os.environ.setdefault('DJANGO_SETTINGS_MODULE', 'mysite.settings')\n",
        );
        assert_eq!(
            default_settings_module(&manage).as_deref(),
            Some("mysite.settings")
        );
        let settings = module(
            "mysite.settings",
            "DEBUG = True\nROOT_URLCONF = 'mysite.urls'\nINSTALLED_APPS = ['blog']\n",
        );
        assert_eq!(
            assigned_string(&settings, "ROOT_URLCONF").as_deref(),
            Some("mysite.urls")
        );
    }

    #[test]
    fn includes_prefix_their_patterns() {
        let root = module(
            "mysite.urls",
            r#"
from django.urls import include, path, re_path
from shop import urls as shop_urls
from . import views

urlpatterns = [
    path("health/", views.health),
    path("api/blog/", include("blog.urls")),
    path("api/shop/", include(shop_urls)),
    path("api/<int:version>/", include("legacy.urls")),
    path("api/v2/", include([
        path("users/<int:pk>/", views.user),
        path("users/me/", views.me),
    ])),
    re_path(r"^legacy/", include("legacy.urls")),
]
"#,
        );
        let blog = module(
            "blog.urls",
            "from django.urls import path\nfrom . import views\nurlpatterns = [\n    path('articles/<slug:slug>/', views.article),\n    path('', views.index),\n]\n",
        );
        let shop = module(
            "shop.urls",
            "from django.urls import path\nurlpatterns = [path('orders/<uuid:order>/', v)]\n",
        );
        let legacy = module(
            "legacy.urls",
            "from django.urls import re_path\nurlpatterns = [re_path(r'^archive/(?P<year>[0-9]{4})/$', v)]\n",
        );
        assert_eq!(
            included_modules(&root),
            vec!["blog.urls", "shop.urls", "legacy.urls", "legacy.urls"]
        );
        let scanned = scan(&[root, blog, shop, legacy], "mysite.urls");
        assert_eq!(
            scanned.templates,
            vec![
                "api/blog/",
                "api/blog/articles/<slug:slug>/",
                "api/shop/orders/<uuid:order>/",
                "api/v2/users/<int:pk>/",
                "api/v2/users/me/",
                "health/",
            ]
        );
        assert_eq!(
            scanned.regex_templates,
            vec!["^legacy/archive/(?P<year>[0-9]{4})/$"]
        );
        assert_eq!(
            scanned.unresolved,
            vec![
                "legacy.urls: api/<int:version>/archive/(?P<year>[0-9]{4})/$ mixes path() and re_path() routes"
            ]
        );
    }

    #[test]
    fn a_regex_under_a_literal_path_prefix_is_a_regex() {
        let root = module(
            "mysite.urls",
            "urlpatterns = [path('api/blog/', include('blog.urls'))]\n",
        );
        let blog = module(
            "blog.urls",
            "urlpatterns = [re_path(r'^archive/(?P<year>[0-9]{4})/$', v)]\n",
        );
        let scanned = scan(&[root, blog], "mysite.urls");
        assert_eq!(
            scanned.regex_templates,
            vec!["api/blog/archive/(?P<year>[0-9]{4})/$"]
        );
    }
}
