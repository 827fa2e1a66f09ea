//! What route scanners read in source code of any language: tokens, and calls with their
//! arguments (string literals, names, or something computed).

use std::collections::HashMap;

/// A token, as far as route declarations need: names, string literals (their value; none when
/// computed, as an f-string or a template literal with `${}`), single punctuation characters and
/// statement ends. Numbers and other operators are `Other`.
#[derive(Clone, Debug, PartialEq)]
pub(super) enum Token {
    Name(String),
    Str(Option<String>),
    Punct(char),
    Newline,
    Other,
}

/// An argument of a call.
#[derive(Clone, Debug, PartialEq)]
pub(super) enum Arg {
    /// A string literal (adjacent literals joined).
    Literal(String),
    /// A name or dotted name (`users.bp`).
    Reference(Vec<String>),
    /// Anything computed.
    Computed,
}

pub(super) struct Call {
    /// The dotted callee (`app.get`, `Blueprint`).
    pub callee: Vec<String>,
    pub positional: Vec<Arg>,
    pub keywords: HashMap<String, Arg>,
    /// The name the call's value is bound to (`bp = Blueprint(...)`).
    pub assigned_to: Option<String>,
    /// Where it is in the token stream, callee to `)`: calls inside it lie within.
    pub tokens: std::ops::Range<usize>,
}

impl Call {
    pub(super) fn arg(&self, position: usize, keyword: &str) -> Option<&Arg> {
        self.positional
            .get(position)
            .or_else(|| self.keywords.get(keyword))
    }
}

pub(super) fn arg_value(tokens: &[Token]) -> Arg {
    if !tokens.is_empty() && tokens.iter().all(|token| matches!(token, Token::Str(_))) {
        let mut joined = String::new();
        for token in tokens {
            match token {
                Token::Str(Some(value)) => joined.push_str(value),
                _ => return Arg::Computed,
            }
        }
        return Arg::Literal(joined);
    }
    let mut path = Vec::new();
    for (index, token) in tokens.iter().enumerate() {
        match token {
            Token::Name(name) if index % 2 == 0 => path.push(name.clone()),
            Token::Punct('.') if index % 2 == 1 => {}
            _ => return Arg::Computed,
        }
    }
    if path.is_empty() || tokens.len().is_multiple_of(2) {
        return Arg::Computed;
    }
    Arg::Reference(path)
}

/// The call whose `(` is at `open`: its arguments and the index after its `)`.
fn call_args(tokens: &[Token], open: usize) -> (Vec<Arg>, HashMap<String, Arg>, usize) {
    let mut positional = Vec::new();
    let mut keywords = HashMap::new();
    let mut depth = 0;
    let mut current: Vec<Token> = Vec::new();
    let mut index = open;
    let mut finish = |current: &mut Vec<Token>| {
        if current.is_empty() {
            return;
        }
        match current.as_slice() {
            [Token::Name(keyword), Token::Punct('='), value @ ..] => {
                keywords.insert(keyword.clone(), arg_value(value));
            }
            value => positional.push(arg_value(value)),
        }
        current.clear();
    };
    while index < tokens.len() {
        let token = &tokens[index];
        match token {
            Token::Punct('(' | '[' | '{') => {
                depth += 1;
                if depth > 1 {
                    current.push(token.clone());
                }
            }
            Token::Punct(')' | ']' | '}') => {
                depth -= 1;
                if depth == 0 {
                    finish(&mut current);
                    return (positional, keywords, index + 1);
                }
                current.push(token.clone());
            }
            Token::Punct(',') if depth == 1 => finish(&mut current),
            _ => current.push(token.clone()),
        }
        index += 1;
    }
    finish(&mut current);
    (positional, keywords, index)
}

/// The variable a statement assigns, when `before` (the tokens before a call) is the start of
/// `name = `, `name: Annotation = ` or `const name = `.
pub(super) fn assigned_name(before: &[Token]) -> Option<String> {
    let line_start = before
        .iter()
        .rposition(|token| *token == Token::Newline)
        .map_or(0, |at| at + 1);
    let mut statement = &before[line_start..];
    // JavaScript declares: `const app = express()`.
    if let [Token::Name(keyword), rest @ ..] = statement
        && matches!(keyword.as_str(), "const" | "let" | "var")
    {
        statement = rest;
    }
    match statement {
        [Token::Name(name), Token::Punct('=')] => Some(name.clone()),
        [Token::Name(name), Token::Punct(':'), .., Token::Punct('=')] => Some(name.clone()),
        _ => None,
    }
}

/// Every call in the source, with the name it is assigned to when it is the whole right-hand
/// side of `name = ...`.
pub(super) fn calls(tokens: &[Token]) -> Vec<Call> {
    let mut found = Vec::new();
    let mut index = 0;
    while index < tokens.len() {
        let Token::Name(first) = &tokens[index] else {
            index += 1;
            continue;
        };
        let start = index;
        let mut callee = vec![first.clone()];
        index += 1;
        while let (Some(Token::Punct('.')), Some(Token::Name(next))) =
            (tokens.get(index), tokens.get(index + 1))
        {
            callee.push(next.clone());
            index += 2;
        }
        if tokens.get(index) != Some(&Token::Punct('(')) {
            continue;
        }
        let (positional, keywords, end) = call_args(tokens, index);
        let assigned_to = assigned_name(&tokens[..start]);
        found.push(Call {
            callee,
            positional,
            keywords,
            assigned_to,
            tokens: start..end,
        });
        // Step inside the parentheses too: calls nest (`app.include_router(make_router())`).
        index += 1;
    }
    found
}
