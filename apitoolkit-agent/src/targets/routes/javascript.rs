//! Route declarations in an Express application's JavaScript: `app.get('/users/:id')` …,
//! `app.route('/book')`, `express.Router()`, and `app.use('/api', router)` across the files
//! it `require`s or `import`s (a router is what a file exports: `module.exports = router`,
//! `export default router`).

use std::collections::HashMap;

use super::{
    mounts::{self, Declarations, Framework, Object, Scanned},
    syntax::{Arg, Call, Token, calls},
};

/// The name standing for what a file exports as a whole.
const DEFAULT_EXPORT: &str = "default";

const ROUTE_METHODS: [&str; 9] = [
    "get", "post", "put", "patch", "delete", "all", "options", "head", "route",
];

/// Keywords after which a `/` starts a regular expression, not a division.
const BEFORE_REGEX: [&str; 6] = ["return", "typeof", "case", "in", "of", "yield"];

fn tokenize(source: &str) -> Vec<Token> {
    let bytes = source.as_bytes();
    let mut tokens: Vec<Token> = Vec::new();
    let mut depth = 0usize;
    let mut at = 0;
    while at < bytes.len() {
        // Other text is read a byte at a time, which can stop inside a multi-byte character.
        if !source.is_char_boundary(at) {
            at += 1;
            continue;
        }
        let c = bytes[at];
        let rest = &source[at..];
        if rest.starts_with("//") {
            at += rest.find('\n').unwrap_or(rest.len());
            continue;
        }
        if rest.starts_with("/*") {
            at += rest.find("*/").map_or(rest.len(), |end| end + 2);
            continue;
        }
        match c {
            b'\n' | b';' => {
                if depth == 0 || c == b';' {
                    tokens.push(Token::Newline);
                }
                at += 1;
            }
            b'\'' | b'"' | b'`' => {
                let mut end = at + 1;
                let mut value = String::new();
                let mut computed = false;
                while end < bytes.len() && bytes[end] != c {
                    if bytes[end] == b'\\' && end + 1 < bytes.len() {
                        end += 1;
                    } else if c == b'`' && source[end..].starts_with("${") {
                        computed = true;
                    }
                    let ch = source[end..].chars().next().unwrap_or_default();
                    value.push(ch);
                    end += ch.len_utf8();
                }
                tokens.push(Token::Str((!computed).then_some(value)));
                at = end + 1;
            }
            b'/' => {
                let regex = match tokens.last() {
                    None | Some(Token::Newline | Token::Other) => true,
                    Some(Token::Punct(p)) => !matches!(p, ')' | ']' | '}'),
                    Some(Token::Name(name)) => BEFORE_REGEX.contains(&name.as_str()),
                    Some(Token::Str(_)) => false,
                };
                at += 1;
                if regex {
                    let mut in_class = false;
                    while at < bytes.len() && bytes[at] != b'\n' {
                        match bytes[at] {
                            b'\\' => at += 1,
                            b'[' => in_class = true,
                            b']' => in_class = false,
                            b'/' if !in_class => break,
                            _ => {}
                        }
                        at += 1;
                    }
                    at += 1;
                    while at < bytes.len() && bytes[at].is_ascii_alphabetic() {
                        at += 1;
                    }
                }
                tokens.push(Token::Other);
            }
            _ if c.is_ascii_alphabetic() || c == b'_' || c == b'$' => {
                let start = at;
                while at < bytes.len()
                    && (bytes[at].is_ascii_alphanumeric() || bytes[at] == b'_' || bytes[at] == b'$')
                {
                    at += 1;
                }
                tokens.push(Token::Name(source[start..at].to_owned()));
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
            b'.' | b',' | b':' => {
                tokens.push(Token::Punct(c as char));
                at += 1;
            }
            b'=' if !matches!(bytes.get(at + 1), Some(b'=' | b'>')) => {
                tokens.push(Token::Punct('='));
                at += 1;
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

/// A JavaScript file of the application.
pub struct Module {
    /// Its path relative to the application's directory (`routes/users.js`).
    pub name: String,
    pub source: String,
}

/// The relative specifiers a module requires or imports (`./routes/users`); packages are left
/// out.
pub fn imported_specifiers(module: &Module) -> Vec<String> {
    let tokens = tokenize(&module.source);
    let mut specifiers: Vec<String> = bindings(&tokens)
        .into_values()
        .chain(inline_requires(&tokens))
        .filter(|specifier| specifier.starts_with('.'))
        .collect();
    specifiers.sort();
    specifiers.dedup();
    specifiers
}

/// `const x = require('spec')` and `import x from 'spec'`: local name -> specifier.
fn bindings(tokens: &[Token]) -> HashMap<String, String> {
    let mut bound = HashMap::new();
    for statement in tokens.split(|token| *token == Token::Newline) {
        match statement {
            [
                Token::Name(keyword),
                Token::Name(name),
                Token::Punct('='),
                Token::Name(require),
                Token::Punct('('),
                Token::Str(Some(specifier)),
                Token::Punct(')'),
                ..,
            ] if matches!(keyword.as_str(), "const" | "let" | "var") && require == "require" => {
                bound.insert(name.clone(), specifier.clone());
            }
            [
                Token::Name(import),
                Token::Name(name),
                Token::Name(from),
                Token::Str(Some(specifier)),
                ..,
            ] if import == "import" && from == "from" => {
                bound.insert(name.clone(), specifier.clone());
            }
            _ => {}
        }
    }
    bound
}

/// Specifiers of `require('spec')` used in place (`app.use('/api', require('./api'))`).
fn inline_requires(tokens: &[Token]) -> Vec<String> {
    tokens
        .windows(4)
        .filter_map(|window| match window {
            [
                Token::Name(require),
                Token::Punct('('),
                Token::Str(Some(specifier)),
                Token::Punct(')'),
            ] if require == "require" => Some(specifier.clone()),
            _ => None,
        })
        .collect()
}

/// The module a specifier names, of those that `exist` (`./users` from `routes/index.js` is
/// `routes/users.js`).
pub fn resolve_specifier(
    from: &str,
    specifier: &str,
    exists: &dyn Fn(&str) -> bool,
) -> Option<String> {
    let mut path: Vec<&str> = from.split('/').collect();
    path.pop();
    for part in specifier.split('/') {
        match part {
            "." | "" => {}
            ".." => {
                path.pop();
            }
            part => path.push(part),
        }
    }
    let base = path.join("/");
    ["", ".js", ".cjs", ".mjs", "/index.js"]
        .iter()
        .map(|suffix| format!("{base}{suffix}"))
        .find(|candidate| exists(candidate))
}

/// What the file exports as a whole: `module.exports = name` or `export default name`.
fn default_export(tokens: &[Token]) -> Option<String> {
    tokens
        .split(|token| *token == Token::Newline)
        .find_map(|statement| match statement {
            [
                Token::Name(module),
                Token::Punct('.'),
                Token::Name(exports),
                Token::Punct('='),
                Token::Name(name),
            ] if module == "module" && exports == "exports" => Some(name.clone()),
            [Token::Name(export), Token::Name(default), Token::Name(name)]
                if export == "export" && default == "default" =>
            {
                Some(name.clone())
            }
            _ => None,
        })
}

fn describe(module: &str, call: &Call) -> String {
    format!("{}: {}(...)", module, call.callee.join("."))
}

fn declarations(modules: &[Module]) -> Declarations {
    let known = |name: &str| modules.iter().any(|module| module.name == name);
    let mut found = Declarations::default();
    // (module, DEFAULT_EXPORT) -> the object the module exports.
    let mut exported: HashMap<Object, Object> = HashMap::new();
    for module in modules {
        let tokens = tokenize(&module.source);
        if let Some(name) = default_export(&tokens) {
            exported.insert(
                (module.name.clone(), DEFAULT_EXPORT.to_owned()),
                (module.name.clone(), name),
            );
        }
        let required: HashMap<String, String> = bindings(&tokens)
            .into_iter()
            .filter_map(|(name, specifier)| {
                Some((name, resolve_specifier(&module.name, &specifier, &known)?))
            })
            .collect();
        let object = |name: &str| match required.get(name) {
            Some(file) => (file.clone(), DEFAULT_EXPORT.to_owned()),
            None => (module.name.clone(), name.to_owned()),
        };
        let all = calls(&tokens);
        for (index, call) in all.iter().enumerate() {
            let last = call.callee.last().expect("callees are not empty").as_str();
            let is_app = call.callee == ["express"];
            let is_router = last == "Router" && call.callee.len() <= 2;
            if is_app || is_router {
                if let Some(variable) = &call.assigned_to {
                    found.objects.insert(
                        (module.name.clone(), variable.clone()),
                        (Framework::Express, String::new(), is_app),
                    );
                }
                continue;
            }
            let [owner, _] = call.callee.as_slice() else {
                continue;
            };
            let owner = object(owner);
            // `app.get('env')` reads a setting: a route has a handler after its path.
            let has_handler = last == "route" || call.positional.len() >= 2;
            if ROUTE_METHODS.contains(&last) && has_handler {
                match call.positional.first() {
                    Some(Arg::Literal(path)) => found.routes.push((owner, path.clone())),
                    // `map.get(key)`: not a route; a route's path is a string.
                    Some(Arg::Reference(_)) | None => {}
                    Some(Arg::Computed) => found
                        .unresolved
                        .push(format!("{} (computed path)", describe(&module.name, call))),
                }
            } else if last == "use" {
                let (prefix, mounted) = match call.positional.split_first() {
                    Some((Arg::Literal(prefix), rest)) => (Some(prefix.clone()), rest),
                    _ => (None, call.positional.as_slice()),
                };
                for arg in mounted {
                    if let Arg::Reference(name) = arg
                        && let [name] = name.as_slice()
                    {
                        found
                            .mounts
                            .push((owner.clone(), object(name), prefix.clone()));
                    }
                }
                // `require('./api')` in place: the call after `use(` in the token stream.
                if let Some(inner) = all.get(index + 1)
                    && inner.callee == ["require"]
                    && let Some(Arg::Literal(specifier)) = inner.positional.first()
                    && let Some(file) = resolve_specifier(&module.name, specifier, &known)
                {
                    found
                        .mounts
                        .push((owner.clone(), (file, DEFAULT_EXPORT.to_owned()), prefix));
                }
            }
        }
    }
    // A router used through its file's export is the router the file exports.
    let exported_as = |object: &mut Object| {
        if let Some(target) = exported.get(object) {
            *object = target.clone();
        }
    };
    for (owner, _) in &mut found.routes {
        exported_as(owner);
    }
    for (parent, child, _) in &mut found.mounts {
        exported_as(parent);
        exported_as(child);
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
            source: source.into(),
        }
    }

    /// Non-ASCII identifiers, a non-breaking space, text in a regular expression literal.
    #[test]
    fn non_ascii_text_anywhere_is_read_without_panicking() {
        let source = "const express = require('express');\nconst app = express();\nconst café = 1;\u{a0}// ‘note’\nconst re = /é\\é/;\napp.get('/menü/:id', (req, res) => res.send('ça'));\nconst cut = 'é\\";
        let scanned = scan(&[module("server.js", source)]);
        assert_eq!(scanned.templates, ["/menü/:id"]);
    }

    #[test]
    fn express_routers_mounted_across_files() {
        let server = module(
            "server.js",
            r#"
const express = require("express");
const users = require('./routes/users');
const app = express();
app.use(express.json());
app.use("/api", users);
app.use('/v2', require('./routes/orders'));
// app.get('/commented/:out', h)
app.get("/health", (req, res) => res.json({ ok: /a\/b/.test(req.path) }));
app.route('/book').get(handler).post(handler);
app.listen(process.env.PORT);
if (app.get('env') === 'development') app.set('x', 1);
"#,
        );
        let users = module(
            "routes/users.js",
            r#"
const { Router } = require('express');
const router = Router();
router.get('/users/me', (req, res) => res.json({ me: true }));
router.get(`/users/:id`, (req, res) => res.json({ id: req.params.id }));
router.delete('/users/:id(\\d+)', (req, res) => res.end());
module.exports = router;
"#,
        );
        let orders = module(
            "routes/orders.js",
            "import express from 'express';\nconst r = express.Router();\nr.put('/orders/:ref', h);\nexport default r;\n",
        );
        let scanned = scan(&[server, users, orders]);
        assert_eq!(
            scanned.templates,
            vec![
                "/api/users/:id",
                "/api/users/:id(\\d+)",
                "/api/users/me",
                "/book",
                "/health",
                "/v2/orders/:ref",
            ]
        );
        assert!(scanned.unresolved.is_empty(), "{:?}", scanned.unresolved);
    }

    #[test]
    fn specifiers_resolve_to_known_files() {
        let known = |name: &str| ["server.js", "routes/index.js", "lib/db.cjs"].contains(&name);
        assert_eq!(
            resolve_specifier("server.js", "./routes", &known).as_deref(),
            Some("routes/index.js")
        );
        assert_eq!(
            resolve_specifier("routes/index.js", "../lib/db", &known).as_deref(),
            Some("lib/db.cjs")
        );
        assert_eq!(resolve_specifier("server.js", "./missing", &known), None);
        let module = module(
            "server.js",
            "const a = require('./a');\nimport b from \"../b.js\";\nconst x = require('express');\napp.use(require('./c'));\n",
        );
        assert_eq!(imported_specifiers(&module), vec!["../b.js", "./a", "./c"]);
    }

    #[test]
    fn computed_paths_are_reported() {
        let scanned = scan(&[module(
            "app.js",
            "const app = express();\nconst base = '/x';\napp.get(base + '/y', h);\napp.get(`${base}/z`, h);\napp.get('/ok', h);\n",
        )]);
        assert_eq!(scanned.templates, vec!["/ok"]);
        // Both computed paths give the same note: it is logged once.
        assert_eq!(
            scanned.unresolved,
            vec!["app.js: app.get(...) (computed path)"]
        );
    }
}
