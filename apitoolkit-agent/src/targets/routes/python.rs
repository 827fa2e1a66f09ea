//! Route declarations in Python source: Flask (`@app.route`, `@bp.get`, `add_url_rule`,
//! `Blueprint(url_prefix=)`, `register_blueprint(url_prefix=)`) and FastAPI/Starlette
//! (`@app.get`, `APIRouter(prefix=)`, `include_router(prefix=)`, `add_api_route`), across the
//! application's modules.
//!
//! Only what is declared with string literals can be resolved without running the program; a
//! declaration built at run time (an f-string, a variable, a loop) is reported as unresolved.
//! The source is tokenized (strings, comments, brackets) rather than fully parsed: a route
//! declaration is a call with literal arguments, which tokens show exactly, and no full Python
//! grammar is needed for it.

use std::collections::HashMap;

use super::{
    mounts::{self, Declarations, Framework, Object, Scanned},
    syntax::{Arg, Call, Token, calls},
};

/// The value of a string literal body without its quotes; `None` for an f-string.
fn literal_value(prefix: &str, body: &str) -> Option<String> {
    let prefix = prefix.to_ascii_lowercase();
    if prefix.contains('f') {
        return None;
    }
    if prefix.contains('r') {
        return Some(body.to_owned());
    }
    let mut value = String::new();
    let mut chars = body.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            value.push(c);
            continue;
        }
        match chars.next() {
            Some('n') => value.push('\n'),
            Some('t') => value.push('\t'),
            Some('\n') | None => {}
            Some(other @ ('\\' | '\'' | '"')) => value.push(other),
            Some(other) => {
                value.push('\\');
                value.push(other);
            }
        }
    }
    Some(value)
}

pub(super) fn tokenize(source: &str) -> Vec<Token> {
    let bytes = source.as_bytes();
    let mut tokens = Vec::new();
    let mut depth = 0usize;
    let mut at = 0;
    while at < bytes.len() {
        // A backslash escape or a cut string can end inside a multi-byte character.
        if !source.is_char_boundary(at) {
            at += 1;
            continue;
        }
        let c = bytes[at];
        match c {
            b'#' => {
                while at < bytes.len() && bytes[at] != b'\n' {
                    at += 1;
                }
            }
            b'\n' => {
                if depth == 0 {
                    tokens.push(Token::Newline);
                }
                at += 1;
            }
            b'\\' => at += 2,
            b'\'' | b'"' => {
                let (token, end) = string_at(source, at, "");
                tokens.push(token);
                at = end;
            }
            _ if c.is_ascii_alphabetic() || c == b'_' || c >= 0x80 => {
                let start = at;
                while at < bytes.len()
                    && (bytes[at].is_ascii_alphanumeric() || bytes[at] == b'_' || bytes[at] >= 0x80)
                {
                    at += 1;
                }
                let word = &source[start..at];
                let is_prefix = word.len() <= 2
                    && word.chars().all(|c| "rRbBuUfF".contains(c))
                    && at < bytes.len()
                    && matches!(bytes[at], b'\'' | b'"');
                if is_prefix {
                    let (token, end) = string_at(source, at, word);
                    tokens.push(token);
                    at = end;
                } else {
                    tokens.push(Token::Name(word.to_owned()));
                }
            }
            _ if c.is_ascii_digit() => {
                while at < bytes.len() && (bytes[at].is_ascii_alphanumeric() || bytes[at] == b'.') {
                    at += 1;
                }
                tokens.push(Token::Other);
            }
            b'(' | b'[' | b'{' => {
                depth += 1;
                tokens.push(Token::Punct(c as char));
                at += 1;
            }
            b')' | b']' | b'}' => {
                depth = depth.saturating_sub(1);
                tokens.push(Token::Punct(c as char));
                at += 1;
            }
            b'.' | b',' | b'=' | b'@' | b':' | b';' => {
                // `==`, `<=` … are not the assignments and keywords looked for.
                if c == b'=' && bytes.get(at + 1) == Some(&b'=') {
                    tokens.push(Token::Other);
                    at += 2;
                } else {
                    tokens.push(if c == b';' {
                        Token::Newline
                    } else {
                        Token::Punct(c as char)
                    });
                    at += 1;
                }
            }
            b' ' | b'\t' | b'\r' => at += 1,
            _ => {
                tokens.push(Token::Other);
                at += 1;
            }
        }
    }
    tokens
}

/// The string literal starting at the quote at `at`, and where it ends.
fn string_at(source: &str, at: usize, prefix: &str) -> (Token, usize) {
    let rest = &source[at..];
    let quote = if rest.starts_with("\"\"\"") {
        "\"\"\""
    } else if rest.starts_with("'''") {
        "'''"
    } else {
        &rest[..1]
    };
    let body_start = at + quote.len();
    let bytes = source.as_bytes();
    let mut end = body_start;
    while end < source.len() {
        if bytes[end] == b'\\' {
            end += 2;
            continue;
        }
        if bytes[end..].starts_with(quote.as_bytes()) {
            let value = literal_value(prefix, &source[body_start..end]);
            return (Token::Str(value), end + quote.len());
        }
        if quote.len() == 1 && bytes[end] == b'\n' {
            break;
        }
        end += 1;
    }
    (Token::Str(None), end.min(source.len()))
}

/// `import` statements: local name -> (module, name in it; none for the module itself).
pub(super) fn imports(
    tokens: &[Token],
    package: &str,
) -> HashMap<String, (String, Option<String>)> {
    let mut bound = HashMap::new();
    let lines = tokens.split(|token| *token == Token::Newline);
    for line in lines {
        let words: Vec<String> = line
            .iter()
            .map(|token| match token {
                Token::Name(name) => name.clone(),
                Token::Punct(c) => c.to_string(),
                _ => String::new(),
            })
            .collect();
        match words.first().map(String::as_str) {
            Some("import") => {
                for item in words[1..].split(|word| word == ",") {
                    let (module, alias) = dotted_with_alias(item);
                    if module.is_empty() {
                        continue;
                    }
                    match alias {
                        Some(alias) => bound.insert(alias, (module, None)),
                        // `import a.b` binds `a`; `a.b.x` is resolved through the full name.
                        None => bound.insert(module.clone(), (module, None)),
                    };
                }
            }
            Some("from") => {
                let Some(import_at) = words.iter().position(|word| word == "import") else {
                    continue;
                };
                let module = absolute_module(&words[1..import_at].concat(), package);
                for item in words[import_at + 1..]
                    .split(|word| word == ",")
                    .map(|item| {
                        item.iter()
                            .filter(|word| *word != "(" && *word != ")")
                            .cloned()
                            .collect::<Vec<_>>()
                    })
                {
                    let (name, alias) = dotted_with_alias(&item);
                    if name.is_empty() || name == "*" {
                        continue;
                    }
                    let local = alias.unwrap_or_else(|| name.clone());
                    bound.insert(local, (module.clone(), Some(name)));
                }
            }
            _ => {}
        }
    }
    bound
}

fn dotted_with_alias(words: &[String]) -> (String, Option<String>) {
    match words.iter().position(|word| word == "as") {
        Some(at) => (words[..at].concat(), words.get(at + 1).cloned()),
        None => (words.concat(), None),
    }
}

/// `..models` in package `app.api` is `app.models`.
fn absolute_module(module: &str, package: &str) -> String {
    let dots = module.chars().take_while(|c| *c == '.').count();
    if dots == 0 {
        return module.to_owned();
    }
    let mut base: Vec<&str> = package.split('.').filter(|part| !part.is_empty()).collect();
    base.truncate(base.len().saturating_sub(dots - 1));
    let rest = &module[dots..];
    if !rest.is_empty() {
        base.push(rest);
    }
    base.join(".")
}

/// A Python module of the application.
pub struct Module {
    /// Its dotted name (`app.api.users`); an entry script is named by its file stem.
    pub name: String,
    /// Whether it is a package's `__init__.py`: relative imports then start from itself.
    pub is_package: bool,
    pub source: String,
}

impl Module {
    pub(super) fn package(&self) -> &str {
        if self.is_package {
            &self.name
        } else {
            self.name
                .rsplit_once('.')
                .map_or("", |(package, _)| package)
        }
    }
}

/// The modules a module imports (candidates: they may be packages, modules or names in them).
pub fn imported_modules(module: &Module) -> Vec<String> {
    let tokens = tokenize(&module.source);
    let mut names: Vec<String> = imports(&tokens, module.package())
        .into_values()
        .flat_map(|(module, name)| {
            let submodule = name.map(|name| format!("{module}.{name}"));
            std::iter::once(module).chain(submodule)
        })
        .collect();
    names.sort();
    names.dedup();
    names
}

const ROUTE_METHODS: [&str; 11] = [
    "route",
    "get",
    "post",
    "put",
    "patch",
    "delete",
    "head",
    "options",
    "api_route",
    "add_url_rule",
    "add_api_route",
];

/// Resolves a name used in `module` to the object it denotes.
pub(super) fn resolve(
    reference: &[String],
    module: &str,
    imports: &HashMap<String, (String, Option<String>)>,
) -> Object {
    let (first, rest) = reference.split_first().expect("references are not empty");
    match (imports.get(first), rest) {
        (Some((from, Some(name))), []) => (from.clone(), name.clone()),
        (Some((from, Some(name))), [.., last]) => {
            let middle = &rest[..rest.len() - 1];
            let mut path = vec![from.clone(), name.clone()];
            path.extend(middle.iter().cloned());
            (path.join("."), last.clone())
        }
        (Some((from, None)), [.., last]) if reference.len() > 1 => {
            // `import app.users` then `app.users.bp`, or `import app.users as u` then `u.bp`.
            let middle = &rest[..rest.len() - 1];
            let module = if first == from || from.starts_with(&format!("{first}.")) {
                reference[..reference.len() - 1].join(".")
            } else {
                std::iter::once(from.clone())
                    .chain(middle.iter().cloned())
                    .collect::<Vec<_>>()
                    .join(".")
            };
            (module, last.clone())
        }
        _ if rest.is_empty() => (module.to_owned(), first.clone()),
        _ => (
            reference[..reference.len() - 1].join("."),
            reference[reference.len() - 1].clone(),
        ),
    }
}

fn describe(module: &str, call: &Call) -> String {
    format!("{}: {}(...)", module, call.callee.join("."))
}

fn declarations(modules: &[Module]) -> Declarations {
    let mut found = Declarations::default();
    for module in modules {
        let tokens = tokenize(&module.source);
        let imports = imports(&tokens, module.package());
        for call in calls(&tokens) {
            let last = call.callee.last().expect("callees are not empty").as_str();
            let constructed = match last {
                "Flask" => Some((Framework::Flask, None, true)),
                "Blueprint" => Some((Framework::Flask, call.arg(5, "url_prefix"), false)),
                "FastAPI" | "Starlette" => Some((Framework::FastApi, None, true)),
                // Keyword-only in FastAPI.
                "APIRouter" => Some((Framework::FastApi, call.keywords.get("prefix"), false)),
                _ => None,
            };
            if let Some((framework, prefix, is_app)) = constructed {
                if let Some(variable) = &call.assigned_to {
                    let prefix = match prefix {
                        None => String::new(),
                        Some(Arg::Literal(prefix)) => prefix.clone(),
                        Some(_) => {
                            found.unresolved.push(format!(
                                "{} (computed prefix)",
                                describe(&module.name, &call)
                            ));
                            String::new()
                        }
                    };
                    found.objects.insert(
                        (module.name.clone(), variable.clone()),
                        (framework, prefix, is_app),
                    );
                }
                continue;
            }
            if call.callee.len() < 2 {
                continue;
            }
            let owner = resolve(
                &call.callee[..call.callee.len() - 1],
                &module.name,
                &imports,
            );
            if ROUTE_METHODS.contains(&last) {
                match call.arg(
                    0,
                    if last == "add_url_rule" {
                        "rule"
                    } else {
                        "path"
                    },
                ) {
                    Some(Arg::Literal(template)) => found.routes.push((owner, template.clone())),
                    // `@app.get()` with no path is not a route (e.g. `dict.get`).
                    None => {}
                    Some(_) => found
                        .unresolved
                        .push(format!("{} (computed path)", describe(&module.name, &call))),
                }
            } else if last == "register_blueprint" || last == "include_router" {
                let keyword = if last == "register_blueprint" {
                    "url_prefix"
                } else {
                    "prefix"
                };
                let prefix = match call.keywords.get(keyword) {
                    None => None,
                    Some(Arg::Literal(prefix)) => Some(prefix.clone()),
                    Some(_) => {
                        found.unresolved.push(describe(&module.name, &call));
                        None
                    }
                };
                match call.positional.first() {
                    Some(Arg::Reference(child)) => {
                        let child = resolve(child, &module.name, &imports);
                        found.mounts.push((owner, child, prefix));
                    }
                    _ => found.unresolved.push(describe(&module.name, &call)),
                }
            }
        }
    }
    found
}

/// The full templates of the application in `modules`.
pub fn scan(modules: &[Module]) -> Scanned {
    mounts::templates(declarations(modules))
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

    /// Application text is rarely ASCII only: accents, typographic quotes and dashes in
    /// docstrings, escapes of multi-byte characters, a cut string at the end of the file.
    #[test]
    fn non_ascii_text_anywhere_is_read_without_panicking() {
        let source = "# café — ‘menu’\nfrom flask import Flask\napp = Flask(__name__)\n\n@app.get(\"/caf\\é/<int:n>\")\ndef menu(n):\n    \"\"\"Returns the user’s menu — cached.\"\"\"\n    return {\"msg\": \"café\\é\", 'x': '\\“'}\n\n@app.route('/menü')\ndef menü():\n    return 'ok'\nunterminated = \"é\\é";
        let scanned = scan(&[module("app", source)]);
        assert_eq!(scanned.templates, ["/caf\\é/<int:n>", "/menü"]);
    }

    #[test]
    fn flask_blueprints_with_prefixes_across_modules() {
        let app = module(
            "app",
            r#"
import os
from flask import Flask, jsonify
from shop.accounts import accounts as accounts_bp
from shop import invoices
import shop.admin

app = Flask(__name__)
app.register_blueprint(accounts_bp)
app.register_blueprint(invoices.bp, url_prefix="/billing")
app.register_blueprint(shop.admin.bp)

@app.route("/users/<user_id>", methods=["GET", "PUT"])
def user(user_id):
    return jsonify(id=user_id)

@app.get('/users/me')
def me():  # @app.get("/commented/out")
    return {"path": "/not/a/route"}

def health():
    return "ok"

app.add_url_rule("/health", view_func=health)
"#,
        );
        let accounts = module(
            "shop.accounts",
            r#"
from flask import Blueprint
accounts = Blueprint("accounts", __name__, url_prefix="/accounts/")

@accounts.get("/<int:account_id>")
def get_account(account_id):
    return {}

@accounts.route("/<int:account_id>/files/<path:name>", methods=("GET",))
def file(account_id, name):
    return {}
"#,
        );
        let invoices = module(
            "shop.invoices",
            "from flask import Blueprint\nbp = Blueprint('invoices', __name__, url_prefix='/ignored')\n\n@bp.put('/invoices/<ref>')\ndef put(ref):\n    return ''\n",
        );
        let admin = module(
            "shop.admin",
            "import flask\nbp = flask.Blueprint('admin', __name__, url_prefix='/admin')\n@bp.delete('')\ndef wipe():\n    return ''\n",
        );
        let scanned = scan(&[app, accounts, invoices, admin]);
        assert_eq!(
            scanned.templates,
            vec![
                "/accounts/<int:account_id>",
                "/accounts/<int:account_id>/files/<path:name>",
                "/admin",
                "/billing/invoices/<ref>",
                "/health",
                "/users/<user_id>",
                "/users/me",
            ]
        );
        assert_eq!(scanned.unresolved, Vec::<String>::new());
    }

    #[test]
    fn fastapi_routers_with_prefixes() {
        let main = module(
            "main",
            r#"
from fastapi import FastAPI
from .routers import items, users as user_routes

app: FastAPI = FastAPI(title="shop")
app.include_router(items.router, prefix="/api")
app.include_router(user_routes.router)

@app.get("/health")
async def health():
    return {"ok": True}
"#,
        );
        let items = module(
            "routers.items",
            r#"
from fastapi import APIRouter
router = APIRouter(prefix="/items", tags=["items"])

@router.get("/{item_id}")
async def read(item_id: int):
    return {}

@router.get("/special")
async def special():
    return {}

@router.api_route("/{item_id}/photo/{rest:path}", methods=["GET"])
async def photo(item_id: int, rest: str):
    return {}
"#,
        );
        let users = module(
            "routers.users",
            "from fastapi import APIRouter\nrouter = APIRouter()\nrouter.add_api_route('/users/{uid}', endpoint=lambda uid: uid)\n",
        );
        let scanned = scan(&[
            Module {
                is_package: false,
                ..main
            },
            items,
            users,
        ]);
        assert_eq!(
            scanned.templates,
            vec![
                "/api/items/special",
                "/api/items/{item_id}",
                "/api/items/{item_id}/photo/{rest:path}",
                "/health",
                "/users/{uid}",
            ]
        );
    }

    #[test]
    fn computed_declarations_are_reported() {
        let scanned = scan(&[module(
            "app",
            r#"
from flask import Flask, Blueprint
app = Flask(__name__)
VERSION = "v1"
api = Blueprint("api", __name__, url_prefix=f"/{VERSION}")

@app.get(f"/{VERSION}/status")
def status():
    return ""

@api.get("/things")
def things():
    return ""

for blueprint in [api]:
    app.register_blueprint(blueprint)

config = {}
config.get("x")
"#,
        )]);
        assert_eq!(scanned.templates, vec!["/things"]);
        // The f-string prefix, the f-string route, the loop's mount and the blueprint it
        // leaves unmounted.
        assert_eq!(scanned.unresolved.len(), 4, "{:?}", scanned.unresolved);
        assert!(
            scanned
                .unresolved
                .iter()
                .any(|note| note.contains("app.get(...) (computed path)"))
        );
        assert!(
            scanned
                .unresolved
                .iter()
                .any(|note| note.contains("never mounted"))
        );
    }

    #[test]
    fn imports_name_the_modules_to_read() {
        let package = Module {
            name: "shop".into(),
            is_package: true,
            source:
                "from . import accounts\nfrom .invoices import bp\nimport os, shop.admin as admin\n"
                    .into(),
        };
        assert_eq!(
            imported_modules(&package),
            vec![
                "os",
                "shop",
                "shop.accounts",
                "shop.admin",
                "shop.invoices",
                "shop.invoices.bp"
            ]
        );
    }

    #[test]
    fn strings_and_comments_tokenize() {
        assert_eq!(
            tokenize("x = r'a\\d' 'b' # c\n\"\"\"doc\n'x'\"\"\" f'{y}'"),
            vec![
                Token::Name("x".into()),
                Token::Punct('='),
                Token::Str(Some("a\\d".into())),
                Token::Str(Some("b".into())),
                Token::Newline,
                Token::Str(Some("doc\n'x'".into())),
                Token::Str(None),
            ]
        );
    }
}
