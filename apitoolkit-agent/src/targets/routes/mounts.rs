//! From declarations to full templates: routes declared on apps and routers, routers mounted
//! on others under prefixes, joined the way each framework joins them.

use std::collections::{HashMap, HashSet};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Framework {
    /// A blueprint's prefix replaces at registration; prefix and rule joined by one `/`.
    Flask,
    /// `include_router` prefix, then the router's own, then the path, as written.
    FastApi,
    /// `app.use` mount paths, then the route path, as written (`req.baseUrl + req.route.path`).
    Express,
}

/// An application or router object: `(module, variable)`.
pub type Object = (String, String);

#[derive(Default)]
pub struct Declarations {
    /// Apps and routers, with the framework and the prefix given at construction.
    pub objects: HashMap<Object, (Framework, String, bool)>,
    /// Templates declared on each object.
    pub routes: Vec<(Object, String)>,
    /// `parent.register_blueprint(child, url_prefix=)`, `include_router(child, prefix=)`,
    /// `app.use(prefix, child)`.
    pub mounts: Vec<(Object, Object, Option<String>)>,
    pub unresolved: Vec<String>,
}

/// What the scan found: the full templates, and declarations it could not resolve.
#[derive(Debug, Default, PartialEq)]
pub struct Scanned {
    pub templates: Vec<String>,
    /// Regular expressions (Django `re_path()`), reported as written.
    pub regex_templates: Vec<String>,
    pub unresolved: Vec<String>,
}

/// Flask joins a blueprint's prefix and a rule with exactly one `/`.
fn flask_join(prefix: &str, rule: &str) -> String {
    if prefix.is_empty() {
        return rule.to_owned();
    }
    if rule.is_empty() {
        return prefix.to_owned();
    }
    format!(
        "{}/{}",
        prefix.trim_end_matches('/'),
        rule.trim_start_matches('/')
    )
}

/// The full templates: each route under the prefixes of the routers and blueprints that mount
/// it, from the application objects down.
pub fn templates(mut found: Declarations) -> Scanned {
    let mut templates = Vec::new();
    // (object, prefix so far), from every application object; objects are never revisited
    // on one path, so mount cycles end.
    let mut pending: Vec<(Object, String, Vec<Object>)> = found
        .objects
        .iter()
        .filter(|(_, (_, _, is_app))| *is_app)
        .map(|(object, _)| (object.clone(), String::new(), vec![object.clone()]))
        .collect();
    let mut reached: HashSet<Object> = HashSet::new();
    while let Some((object, prefix, path)) = pending.pop() {
        reached.insert(object.clone());
        let Some((framework, _, _)) = found.objects.get(&object).cloned() else {
            continue;
        };
        for (owner, template) in &found.routes {
            if *owner == object {
                templates.push(match framework {
                    Framework::Flask => flask_join(&prefix, template),
                    Framework::FastApi | Framework::Express => format!("{prefix}{template}"),
                });
            }
        }
        for (parent, child, mount_prefix) in &found.mounts {
            if *parent != object || path.contains(child) {
                continue;
            }
            let Some((_, own_prefix, _)) = found.objects.get(child) else {
                // Express's `use` mounts middleware as often as routers.
                if framework == Framework::Express {
                    continue;
                }
                found.unresolved.push(format!(
                    "{}: {} mounts {}.{}, which is not an application's router",
                    parent.0, parent.1, child.0, child.1
                ));
                continue;
            };
            let child_prefix = match framework {
                // Flask: the registration's url_prefix replaces the blueprint's own.
                Framework::Flask => flask_join(
                    &prefix,
                    mount_prefix.as_deref().unwrap_or(own_prefix.as_str()),
                ),
                // FastAPI: include_router's prefix, then the router's own.
                Framework::FastApi | Framework::Express => format!(
                    "{prefix}{}{own_prefix}",
                    mount_prefix.as_deref().unwrap_or_default()
                ),
            };
            let mut child_path = path.clone();
            child_path.push(child.clone());
            pending.push((child.clone(), child_prefix, child_path));
        }
    }
    // A router nobody mounts in the source is mounted at run time (a loop, a factory):
    // its routes under its own prefix are the best guess, and it is reported.
    for (object, (framework, own_prefix, _)) in &found.objects {
        if reached.contains(object) {
            continue;
        }
        let mut declared = found
            .routes
            .iter()
            .filter(|(owner, _)| owner == object)
            .peekable();
        if declared.peek().is_none() {
            continue;
        }
        found.unresolved.push(format!(
            "{}: {} is never mounted in the source; its routes are taken under its own prefix",
            object.0, object.1
        ));
        for (_, template) in declared {
            templates.push(match framework {
                Framework::Flask => flask_join(own_prefix, template),
                Framework::FastApi | Framework::Express => format!("{own_prefix}{template}"),
            });
        }
    }
    templates.sort();
    templates.dedup();
    found.unresolved.sort();
    found.unresolved.dedup();
    Scanned {
        templates,
        regex_templates: Vec::new(),
        unresolved: found.unresolved,
    }
}
