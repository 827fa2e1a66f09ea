//! Route templates: which declared route a request path belongs to, and the values of its path
//! parameters, so a payload's `url_path` is the template the framework's SDK reports
//! (`/accounts/<int:account_id>`) and `path_params` holds the converted values (`7`).
//!
//! A template is written in the syntax of the framework that declared it, recognised from the
//! template itself: `<conv:name>` (Flask, Django `path()`), `{name}` / `{name:conv}`
//! (FastAPI/Starlette, OpenAPI), `:name` (Express), or a regular expression with named groups
//! (Django `re_path()`, made with [`Template::regex`]). Each compiles to one anchored regex, as
//! the frameworks compile them.

use std::{cmp::Ordering, sync::Arc};

use regex::Regex;
use serde_json::{Map, Number, Value};

#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    #[error("route template {template:?}: {reason}")]
    Invalid { template: String, reason: String },
}

/// What a path parameter accepts and what its value becomes.
#[derive(Clone, Debug, PartialEq, Eq)]
enum ParamKind {
    /// One segment (Flask's default and `string`, Django's `str`, Starlette's `str`).
    Text,
    /// Digits, sent as a JSON number.
    Int,
    /// A decimal, sent as a JSON number.
    Float,
    Uuid,
    /// Letters, digits, `-` and `_` (Django).
    Slug,
    /// One of the listed words (Flask's `any(a, b)`).
    OneOf(Vec<String>),
    /// A regular expression of the template's own (Express `:id(\d+)`).
    Pattern(String),
    /// Any rest of the path, slashes included.
    Path,
}

impl ParamKind {
    /// From a Flask/Django/Starlette converter name and its arguments.
    fn from_converter(name: &str, args: Option<&str>) -> Self {
        match name {
            "int" => ParamKind::Int,
            "float" => ParamKind::Float,
            "uuid" => ParamKind::Uuid,
            "slug" => ParamKind::Slug,
            "path" => ParamKind::Path,
            "any" => ParamKind::OneOf(
                args.unwrap_or_default()
                    .split(',')
                    .map(|word| word.trim().trim_matches(['"', '\'']).to_owned())
                    .filter(|word| !word.is_empty())
                    .collect(),
            ),
            // `string`, `str`, `default` and converters of the application's own, whose
            // pattern is unknown: one segment.
            _ => ParamKind::Text,
        }
    }

    fn regex(&self) -> String {
        match self {
            ParamKind::Text => "[^/]+".into(),
            ParamKind::Int => "[0-9]+".into(),
            ParamKind::Float => r"[0-9]+\.[0-9]+".into(),
            ParamKind::Uuid => {
                "[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}".into()
            }
            ParamKind::Slug => "[-a-zA-Z0-9_]+".into(),
            ParamKind::OneOf(words) => words
                .iter()
                .map(|word| regex::escape(word))
                .collect::<Vec<_>>()
                .join("|"),
            ParamKind::Pattern(pattern) => pattern.clone(),
            ParamKind::Path => ".+".into(),
        }
    }

    /// How narrowly it matches, most specific first: typed converters before a plain
    /// segment, a plain segment before the rest of the path.
    fn rank(&self) -> u8 {
        match self {
            ParamKind::OneOf(_) => 1,
            ParamKind::Int | ParamKind::Float | ParamKind::Uuid | ParamKind::Pattern(_) => 2,
            ParamKind::Slug => 3,
            ParamKind::Text => 4,
            ParamKind::Path => 5,
        }
    }

    fn value(&self, text: String) -> Value {
        let number = match self {
            ParamKind::Int => text.parse::<u64>().ok().map(Number::from),
            ParamKind::Float => text.parse::<f64>().ok().and_then(Number::from_f64),
            _ => None,
        };
        number.map_or(Value::String(text), Value::Number)
    }
}

/// A piece of a template: literal text, or a parameter.
#[derive(Debug, PartialEq)]
enum Part {
    Static(String),
    Param {
        name: String,
        kind: ParamKind,
        /// Express `:name?`: the segment may be absent.
        optional: bool,
    },
}

/// A parameter of a compiled template.
#[derive(Clone, Debug)]
struct Param {
    /// Its capture group in the template's regex.
    group: String,
    /// Its key in `path_params` (an unnamed Express `*` is `0`).
    name: String,
    kind: ParamKind,
}

/// One route template, compiled.
#[derive(Clone, Debug)]
pub struct Template {
    /// The template as the framework's SDK reports it in `url_path`.
    reported: String,
    regex: Regex,
    params: Vec<Param>,
    /// Per `/`-separated segment: 0 for literal text, else the loosest parameter's rank
    /// (a segment mixing text and a parameter ranks just after literal text).
    ranks: Vec<u8>,
}

impl PartialEq for Template {
    fn eq(&self, other: &Self) -> bool {
        self.reported == other.reported && self.regex.as_str() == other.regex.as_str()
    }
}

impl Eq for Template {}

fn invalid(template: &str, reason: impl Into<String>) -> TemplateError {
    TemplateError::Invalid {
        template: template.to_owned(),
        reason: reason.into(),
    }
}

/// The parts of a `<conv(args):name>` template (Flask, Django).
fn angle_parts(template: &str) -> Result<Vec<Part>, TemplateError> {
    let mut parts = Vec::new();
    let mut rest = template;
    while let Some(start) = rest.find('<') {
        parts.push(Part::Static(rest[..start].to_owned()));
        let end = rest[start..]
            .find('>')
            .ok_or_else(|| invalid(template, "unclosed <"))?
            + start;
        let inner = &rest[start + 1..end];
        let (converter, name) = inner.rsplit_once(':').unwrap_or(("", inner));
        let (converter_name, args) = match converter.split_once('(') {
            Some((name, args)) => (name, Some(args.trim_end_matches(')'))),
            None => (converter, None),
        };
        parts.push(Part::Param {
            name: name.trim().to_owned(),
            kind: ParamKind::from_converter(converter_name.trim(), args),
            optional: false,
        });
        rest = &rest[end + 1..];
    }
    parts.push(Part::Static(rest.to_owned()));
    Ok(parts)
}

/// The parts of a `{name}` / `{name:conv}` template (Starlette, OpenAPI).
fn brace_parts(template: &str) -> Result<Vec<Part>, TemplateError> {
    let mut parts = Vec::new();
    let mut rest = template;
    while let Some(start) = rest.find('{') {
        parts.push(Part::Static(rest[..start].to_owned()));
        let end = rest[start..]
            .find('}')
            .ok_or_else(|| invalid(template, "unclosed {"))?
            + start;
        let inner = &rest[start + 1..end];
        let (name, converter) = inner.split_once(':').unwrap_or((inner, "str"));
        parts.push(Part::Param {
            name: name.trim().to_owned(),
            kind: ParamKind::from_converter(converter.trim(), None),
            optional: false,
        });
        rest = &rest[end + 1..];
    }
    parts.push(Part::Static(rest.to_owned()));
    Ok(parts)
}

/// The parts of an Express (path-to-regexp 0.1) template: `:name`, `:name?`, `:name(re)`, `*`.
fn colon_parts(template: &str) -> Result<Vec<Part>, TemplateError> {
    let mut parts = Vec::new();
    let mut text = String::new();
    let mut chars = template.char_indices().peekable();
    let mut unnamed = 0;
    while let Some((index, c)) = chars.next() {
        match c {
            ':' if chars
                .peek()
                .is_some_and(|(_, next)| next.is_ascii_alphanumeric() || *next == '_') =>
            {
                let mut name = String::new();
                while let Some((_, next)) = chars.peek()
                    && (next.is_ascii_alphanumeric() || *next == '_')
                {
                    name.push(*next);
                    chars.next();
                }
                let mut kind = ParamKind::Text;
                if chars.peek().is_some_and(|(_, next)| *next == '(') {
                    let start = index + 1 + name.len() + 1;
                    let mut depth = 0;
                    let mut end = None;
                    for (at, next) in chars.by_ref() {
                        match next {
                            '(' => depth += 1,
                            ')' => {
                                depth -= 1;
                                if depth == 0 {
                                    end = Some(at);
                                    break;
                                }
                            }
                            _ => {}
                        }
                    }
                    let end = end.ok_or_else(|| invalid(template, "unclosed ( in a parameter"))?;
                    kind = ParamKind::Pattern(template[start..end].to_owned());
                }
                let optional = chars.next_if(|(_, next)| *next == '?').is_some();
                parts.push(Part::Static(std::mem::take(&mut text)));
                parts.push(Part::Param {
                    name,
                    kind,
                    optional,
                });
            }
            '*' => {
                parts.push(Part::Static(std::mem::take(&mut text)));
                parts.push(Part::Param {
                    name: unnamed.to_string(),
                    kind: ParamKind::Path,
                    optional: false,
                });
                unnamed += 1;
            }
            _ => text.push(c),
        }
    }
    parts.push(Part::Static(text));
    Ok(parts)
}

/// Per-segment ranks of a template's parts.
fn segment_ranks(parts: &[Part]) -> Vec<u8> {
    let mut ranks = vec![0u8];
    let mut has_text = false;
    for part in parts {
        match part {
            Part::Static(text) => {
                let mut pieces = text.split('/');
                if pieces.next().is_some_and(|piece| !piece.is_empty()) {
                    has_text = true;
                }
                for piece in pieces {
                    finish_segment(&mut ranks, has_text);
                    ranks.push(0);
                    has_text = !piece.is_empty();
                }
            }
            Part::Param { kind, .. } => {
                let last = ranks.last_mut().expect("starts with one segment");
                *last = (*last).max(kind.rank());
            }
        }
    }
    finish_segment(&mut ranks, has_text);
    ranks
}

/// A segment mixing literal text with a parameter (`<name>.txt`) ranks before a bare one.
fn finish_segment(ranks: &mut [u8], has_text: bool) {
    if let Some(last) = ranks.last_mut()
        && *last > 0
        && has_text
    {
        *last = 1;
    }
}

impl Template {
    /// A template in Flask, Django `path()`, Starlette, OpenAPI or Express syntax, reported
    /// as written. Django reports its routes without the leading `/`, so a template is
    /// matched as if it had one.
    pub fn parse(reported: &str) -> Result<Self, TemplateError> {
        Self::matched_as(reported, reported)
    }

    /// A template reported as `reported` that matches as `template` does (an OpenAPI `{id}`
    /// whose schema says integer matches as `{id:int}`).
    fn matched_as(reported: &str, template: &str) -> Result<Self, TemplateError> {
        let (parts, express) = if template.contains('<') {
            (angle_parts(template)?, false)
        } else if template.contains('{') {
            (brace_parts(template)?, false)
        } else {
            let parts = colon_parts(template)?;
            // Express matches case-insensitively and with or without a trailing slash.
            let express = parts.iter().any(|part| matches!(part, Part::Param { .. }));
            (parts, express)
        };
        let mut pattern = String::from(if express { "^(?i)" } else { "^" });
        if !template.starts_with('/') {
            pattern.push('/');
        }
        let mut params = Vec::new();
        for part in &parts {
            match part {
                Part::Static(text) => pattern.push_str(&regex::escape(text)),
                Part::Param {
                    name,
                    kind,
                    optional,
                } => {
                    let group = format!("p{}", params.len());
                    let body = format!("(?P<{group}>{})", kind.regex());
                    if *optional && pattern.ends_with('/') {
                        // `/:id?` drops its slash too when absent.
                        pattern.pop();
                        pattern.push_str(&format!("(?:/{body})?"));
                    } else if *optional {
                        pattern.push_str(&format!("{body}?"));
                    } else {
                        pattern.push_str(&body);
                    }
                    params.push(Param {
                        group,
                        name: name.clone(),
                        kind: kind.clone(),
                    });
                }
            }
        }
        if express && !pattern.ends_with('/') {
            pattern.push_str("/?");
        }
        pattern.push('$');
        let regex = Regex::new(&pattern).map_err(|error| invalid(reported, error.to_string()))?;
        Ok(Self {
            reported: reported.to_owned(),
            regex,
            params,
            ranks: segment_ranks(&parts),
        })
    }

    /// A Django `re_path()` route: a regular expression whose named groups are the
    /// parameters (strings), reported as written. Django matches it against the path without
    /// its leading `/`.
    pub fn regex(reported: &str) -> Result<Self, TemplateError> {
        let body = reported.strip_prefix('^').unwrap_or(reported);
        let pattern = format!("^/{body}");
        let pattern = if pattern.ends_with('$') {
            pattern
        } else {
            // Django's resolver needs no `$`: an unanchored re_path matches a prefix.
            format!("{pattern}.*$")
        };
        let regex = Regex::new(&pattern).map_err(|error| invalid(reported, error.to_string()))?;
        let params = regex
            .capture_names()
            .flatten()
            .map(|name| Param {
                group: name.to_owned(),
                name: name.to_owned(),
                kind: ParamKind::Text,
            })
            .collect();
        let ranks = vec![0, ParamKind::Pattern(String::new()).rank()];
        Ok(Self {
            reported: reported.to_owned(),
            regex,
            params,
            ranks,
        })
    }

    pub fn reported(&self) -> &str {
        &self.reported
    }

    /// The converted parameters when the path matches.
    fn captures(&self, path: &str) -> Option<Map<String, Value>> {
        let captures = self.regex.captures(path)?;
        let mut values = Map::new();
        for Param { group, name, kind } in &self.params {
            let Some(text) = captures.name(group) else {
                continue;
            };
            let text = percent_encoding::percent_decode_str(text.as_str())
                .decode_utf8_lossy()
                .into_owned();
            values.insert(name.clone(), kind.value(text));
        }
        Some(values)
    }

    /// Most specific first: segment by segment, literal text before typed parameters before
    /// plain ones before the rest of the path; where one template's segments begin the
    /// other's, the longer first.
    fn specificity(&self, other: &Self) -> Ordering {
        self.ranks
            .iter()
            .zip(&other.ranks)
            .map(|(mine, theirs)| mine.cmp(theirs))
            .find(|order| order.is_ne())
            .unwrap_or_else(|| other.ranks.len().cmp(&self.ranks.len()))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RoutesFileError {
    #[error("not a list of templates nor an OpenAPI 3 document: {0}")]
    Syntax(String),
    #[error("an OpenAPI document needs a `paths` object")]
    NoPaths,
    #[error("the list holds {0}, not a template string")]
    NotATemplate(Value),
    #[error(transparent)]
    Template(#[from] TemplateError),
    #[error("no route templates in it")]
    Empty,
}

/// The templates of a `--routes` file: one template a line (`#` starts a comment), a JSON or
/// YAML list of templates, or an OpenAPI 3 document (JSON or YAML) whose `paths` are the
/// templates, under the path of each `servers[].url`.
pub fn parse_routes_file(text: &str) -> Result<RouteTable, RoutesFileError> {
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .collect();
    let templates = if lines.iter().all(|line| line.starts_with('/')) {
        lines
            .into_iter()
            .map(Template::parse)
            .collect::<Result<_, _>>()?
    } else {
        let document: Value = serde_yaml_ng::from_str(text)
            .map_err(|error| RoutesFileError::Syntax(error.to_string()))?;
        match document {
            Value::Array(items) => items
                .into_iter()
                .map(|item| match item {
                    Value::String(template) => Ok(Template::parse(&template)?),
                    other => Err(RoutesFileError::NotATemplate(other)),
                })
                .collect::<Result<_, _>>()?,
            Value::Object(document) => openapi_templates(&document)?,
            other => return Err(RoutesFileError::Syntax(format!("found {other}"))),
        }
    };
    let table = RouteTable::new(templates);
    if table.is_empty() {
        return Err(RoutesFileError::Empty);
    }
    Ok(table)
}

/// The path part of an OpenAPI server URL, its `{variables}` set to their defaults:
/// `https://api.example.com/v1/` gives `/v1`.
fn server_prefix(server: &Value) -> String {
    let mut url = server["url"].as_str().unwrap_or_default().to_owned();
    if let Some(variables) = server["variables"].as_object() {
        for (name, variable) in variables {
            let default = variable["default"].as_str().unwrap_or_default();
            url = url.replace(&format!("{{{name}}}"), default);
        }
    }
    let path = match url.split_once("://") {
        Some((_, rest)) => rest.find('/').map_or("", |slash| &rest[slash..]),
        None => &url,
    };
    path.trim_end_matches('/').to_owned()
}

/// OpenAPI's converter for a path parameter, from its schema type.
fn openapi_converter(parameters: &[&Value], name: &str) -> Option<&'static str> {
    let parameter = parameters
        .iter()
        .find(|parameter| parameter["in"] == "path" && parameter["name"] == name)?;
    match parameter["schema"]["type"].as_str()? {
        "integer" => Some("int"),
        "number" => Some("float"),
        _ => None,
    }
}

fn openapi_templates(document: &Map<String, Value>) -> Result<Vec<Template>, RoutesFileError> {
    let paths = document
        .get("paths")
        .and_then(Value::as_object)
        .ok_or(RoutesFileError::NoPaths)?;
    let mut prefixes: Vec<String> = document
        .get("servers")
        .and_then(Value::as_array)
        .map(|servers| servers.iter().map(server_prefix).collect())
        .unwrap_or_default();
    prefixes.sort();
    prefixes.dedup();
    if prefixes.is_empty() {
        prefixes.push(String::new());
    }
    let mut templates = Vec::new();
    for (path, item) in paths {
        // Path-level parameters, then every operation's.
        let parameters: Vec<&Value> = item["parameters"]
            .as_array()
            .into_iter()
            .flatten()
            .chain(
                item.as_object()
                    .into_iter()
                    .flat_map(|operations| operations.values())
                    .filter_map(|operation| operation["parameters"].as_array())
                    .flatten(),
            )
            .collect();
        let typed = brace_parts(path)?
            .into_iter()
            .map(|part| match part {
                Part::Static(text) => text,
                Part::Param { name, .. } => match openapi_converter(&parameters, &name) {
                    Some(converter) => format!("{{{name}:{converter}}}"),
                    None => format!("{{{name}}}"),
                },
            })
            .collect::<String>();
        for prefix in &prefixes {
            templates.push(Template::matched_as(
                &format!("{prefix}{path}"),
                &format!("{prefix}{typed}"),
            )?);
        }
    }
    Ok(templates)
}

/// A request path resolved to its template.
#[derive(Clone, Debug, PartialEq)]
pub struct RouteMatch {
    pub url_path: String,
    pub path_params: Map<String, Value>,
}

/// The templates of one service, most specific first.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RouteTable {
    templates: Vec<Template>,
}

impl RouteTable {
    pub fn new(mut templates: Vec<Template>) -> Self {
        templates.dedup_by(|a, b| a == b);
        // Stable: equally specific templates keep their declaration order.
        templates.sort_by(Template::specificity);
        Self { templates }
    }

    pub fn is_empty(&self) -> bool {
        self.templates.is_empty()
    }

    pub fn len(&self) -> usize {
        self.templates.len()
    }

    pub fn resolve(&self, path: &str) -> Option<RouteMatch> {
        self.templates.iter().find_map(|template| {
            Some(RouteMatch {
                path_params: template.captures(path)?,
                url_path: template.reported.clone(),
            })
        })
    }
}

/// The routes of a process: those configured (`--routes`), which take precedence, then those
/// read from its source.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Routes {
    pub configured: Arc<RouteTable>,
    pub scanned: Arc<RouteTable>,
}

impl Routes {
    pub fn is_empty(&self) -> bool {
        self.configured.is_empty() && self.scanned.is_empty()
    }

    pub fn resolve(&self, path: &str) -> Option<RouteMatch> {
        self.configured
            .resolve(path)
            .or_else(|| self.scanned.resolve(path))
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn table(templates: &[&str]) -> RouteTable {
        RouteTable::new(
            templates
                .iter()
                .map(|template| Template::parse(template).unwrap())
                .collect(),
        )
    }

    fn resolve(table: &RouteTable, path: &str) -> Option<(String, Value)> {
        table
            .resolve(path)
            .map(|found| (found.url_path, Value::Object(found.path_params)))
    }

    fn hit(template: &str, params: Value) -> Option<(String, Value)> {
        Some((template.to_owned(), params))
    }

    #[test]
    fn flask_converters_convert_and_static_segments_win() {
        let routes = table(&[
            "/users/<user_id>",
            "/users/me",
            "/accounts/<int:account_id>",
            "/accounts/<account_name>",
            "/prices/<float:amount>",
            "/files/<path:name>",
            "/files/<path:name>/raw",
            "/orders/<uuid:order>",
            "/lang/<any(en, fr):code>",
        ]);
        assert_eq!(resolve(&routes, "/users/me"), hit("/users/me", json!({})));
        assert_eq!(
            resolve(&routes, "/users/inv-42"),
            hit("/users/<user_id>", json!({"user_id": "inv-42"}))
        );
        assert_eq!(
            resolve(&routes, "/accounts/7"),
            hit("/accounts/<int:account_id>", json!({"account_id": 7}))
        );
        assert_eq!(
            resolve(&routes, "/accounts/acme"),
            hit("/accounts/<account_name>", json!({"account_name": "acme"}))
        );
        assert_eq!(
            resolve(&routes, "/prices/2.5"),
            hit("/prices/<float:amount>", json!({"amount": 2.5}))
        );
        assert_eq!(
            resolve(&routes, "/files/a/b%20c.txt"),
            hit("/files/<path:name>", json!({"name": "a/b c.txt"}))
        );
        assert_eq!(
            resolve(&routes, "/files/a/b/raw"),
            hit("/files/<path:name>/raw", json!({"name": "a/b"}))
        );
        assert_eq!(
            resolve(&routes, "/orders/0b9e7c1a-2f4d-4e8a-9c3b-5d6e7f8a9b0c"),
            hit(
                "/orders/<uuid:order>",
                json!({"order": "0b9e7c1a-2f4d-4e8a-9c3b-5d6e7f8a9b0c"})
            )
        );
        assert_eq!(
            resolve(&routes, "/lang/fr"),
            hit("/lang/<any(en, fr):code>", json!({"code": "fr"}))
        );
        assert_eq!(resolve(&routes, "/lang/de"), None);
        assert_eq!(resolve(&routes, "/orders/not-a-uuid"), None);
        assert_eq!(resolve(&routes, "/users/me/extra"), None);
        assert_eq!(resolve(&routes, "/users/"), None);
    }

    #[test]
    fn starlette_and_openapi_braces() {
        let routes = table(&[
            "/items/{item_id}",
            "/items/{item_id:int}/photo",
            "/static/{rest:path}",
            "/items/special",
        ]);
        // Starlette's request.path_params hold strings unless a convertor says otherwise.
        assert_eq!(
            resolve(&routes, "/items/42"),
            hit("/items/{item_id}", json!({"item_id": "42"}))
        );
        assert_eq!(
            resolve(&routes, "/items/42/photo"),
            hit("/items/{item_id:int}/photo", json!({"item_id": 42}))
        );
        assert_eq!(
            resolve(&routes, "/items/special"),
            hit("/items/special", json!({}))
        );
        assert_eq!(
            resolve(&routes, "/static/css/site.css"),
            hit("/static/{rest:path}", json!({"rest": "css/site.css"}))
        );
    }

    #[test]
    fn express_params_optional_patterns_and_wildcards() {
        let routes = table(&[
            "/api/users/:id",
            "/api/users/me",
            "/api/orders/:id(\\d+)",
            "/api/orders/:slug",
            "/api/books/:isbn/:chapter?",
            "/assets/*",
        ]);
        assert_eq!(
            resolve(&routes, "/api/users/me"),
            hit("/api/users/me", json!({}))
        );
        assert_eq!(
            resolve(&routes, "/api/users/u-9/"),
            hit("/api/users/:id", json!({"id": "u-9"})),
            "Express ignores a trailing slash"
        );
        assert_eq!(
            resolve(&routes, "/API/Users/u-9"),
            hit("/api/users/:id", json!({"id": "u-9"})),
            "Express matches case-insensitively"
        );
        assert_eq!(
            resolve(&routes, "/api/orders/12"),
            hit("/api/orders/:id(\\d+)", json!({"id": "12"}))
        );
        assert_eq!(
            resolve(&routes, "/api/orders/abc"),
            hit("/api/orders/:slug", json!({"slug": "abc"}))
        );
        assert_eq!(
            resolve(&routes, "/api/books/978"),
            hit("/api/books/:isbn/:chapter?", json!({"isbn": "978"}))
        );
        assert_eq!(
            resolve(&routes, "/api/books/978/3"),
            hit(
                "/api/books/:isbn/:chapter?",
                json!({"isbn": "978", "chapter": "3"})
            )
        );
        assert_eq!(
            resolve(&routes, "/assets/js/app.js"),
            hit("/assets/*", json!({"0": "js/app.js"}))
        );
    }

    #[test]
    fn django_routes_are_reported_without_a_leading_slash() {
        let routes = RouteTable::new(vec![
            Template::parse("api/articles/<int:pk>/").unwrap(),
            Template::parse("api/articles/<slug:slug>/").unwrap(),
            Template::parse("api/articles/latest/").unwrap(),
            Template::regex(r"^api/archive/(?P<year>[0-9]{4})/$").unwrap(),
        ]);
        assert_eq!(
            resolve(&routes, "/api/articles/7/"),
            hit("api/articles/<int:pk>/", json!({"pk": 7}))
        );
        assert_eq!(
            resolve(&routes, "/api/articles/hello-world/"),
            hit("api/articles/<slug:slug>/", json!({"slug": "hello-world"}))
        );
        assert_eq!(
            resolve(&routes, "/api/articles/latest/"),
            hit("api/articles/latest/", json!({}))
        );
        assert_eq!(
            resolve(&routes, "/api/archive/2024/"),
            hit(
                r"^api/archive/(?P<year>[0-9]{4})/$",
                json!({"year": "2024"})
            )
        );
        assert_eq!(
            resolve(&routes, "/api/articles/7"),
            None,
            "Django is strict"
        );
    }

    #[test]
    fn configured_routes_take_precedence() {
        let routes = Routes {
            configured: Arc::new(table(&["/users/{user}"])),
            scanned: Arc::new(table(&["/users/me", "/health"])),
        };
        assert_eq!(
            routes.resolve("/users/me").unwrap().url_path,
            "/users/{user}"
        );
        assert_eq!(routes.resolve("/health").unwrap().url_path, "/health");
        assert_eq!(routes.resolve("/nope"), None);
    }

    #[test]
    fn routes_files_are_lines_lists_or_openapi() {
        let lines = parse_routes_file("# ours\n/users/me\n\n/users/{id}\n").unwrap();
        assert_eq!(lines.len(), 2);
        assert_eq!(resolve(&lines, "/users/me"), hit("/users/me", json!({})));
        let list = parse_routes_file("[\"/a/:x\", \"/b/<int:y>\"]").unwrap();
        assert_eq!(resolve(&list, "/b/3"), hit("/b/<int:y>", json!({"y": 3})));
        let yaml_list = parse_routes_file("- /a/:x\n- /b/<int:y>\n").unwrap();
        assert_eq!(resolve(&yaml_list, "/a/q"), hit("/a/:x", json!({"x": "q"})));

        let openapi = r#"
openapi: 3.0.3
info: {title: shop, version: "1"}
servers:
  - url: https://shop.example.com/{base}/
    variables:
      base: {default: v2}
paths:
  /orders/{order_id}:
    parameters:
      - {name: order_id, in: path, required: true, schema: {type: integer}}
    get: {responses: {"200": {description: ok}}}
  /orders/{order_id}/lines/{line}:
    get:
      parameters:
        - {name: order_id, in: path, required: true, schema: {type: integer}}
        - {name: line, in: path, required: true, schema: {type: string}}
      responses: {"200": {description: ok}}
  /orders/latest:
    get: {responses: {"200": {description: ok}}}
"#;
        let routes = parse_routes_file(openapi).unwrap();
        assert_eq!(
            resolve(&routes, "/v2/orders/17"),
            hit("/v2/orders/{order_id}", json!({"order_id": 17}))
        );
        assert_eq!(
            resolve(&routes, "/v2/orders/latest"),
            hit("/v2/orders/latest", json!({}))
        );
        assert_eq!(
            resolve(&routes, "/v2/orders/17/lines/a1"),
            hit(
                "/v2/orders/{order_id}/lines/{line}",
                json!({"order_id": 17, "line": "a1"})
            )
        );
        assert_eq!(resolve(&routes, "/v2/orders/x"), None, "not an integer");
        let json_openapi = r#"{"openapi": "3.1.0", "paths": {"/pets/{petId}": {}}}"#;
        assert_eq!(
            resolve(&parse_routes_file(json_openapi).unwrap(), "/pets/rex"),
            hit("/pets/{petId}", json!({"petId": "rex"}))
        );
    }

    #[test]
    fn bad_routes_files_say_why() {
        let error = |text: &str| parse_routes_file(text).unwrap_err().to_string();
        assert!(error("openapi: 3.0.0\ninfo: {}\n").contains("paths"));
        assert!(error("- /a\n- 7\n").contains("7"));
        assert!(error("/a/<int:b\n").contains("/a/<int:b"));
        assert!(error("# nothing\n").contains("no route templates"));
        assert!(error("paths: [\n").contains("not a list"));
    }

    #[test]
    fn bad_templates_are_named() {
        let error = Template::parse("/users/<int:id").unwrap_err().to_string();
        assert!(error.contains("/users/<int:id"), "{error}");
        assert!(Template::parse("/users/:id((").is_err());
        assert!(Template::regex("^api/(?P<year>[0-9]{4}/$").is_err());
    }
}
