//! Which operation a request runs, decided by a real GraphQL parser (apollo-parser, the one
//! Apollo Router uses) with limits for untrusted input, never by string matching.

use apollo_parser::cst::{self, CstNode};
use apollo_parser::{Lexer, Parser, TokenKind};

/// Nesting deeper than this is refused by the parser (stack safety on hostile input).
const RECURSION_LIMIT: usize = 256;
/// Documents with more tokens than this are not analysed (CPU bound per request).
pub(super) const TOKEN_LIMIT: usize = 50_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OperationKind {
    Query,
    Mutation,
    Subscription,
}

impl OperationKind {
    pub fn as_str(self) -> &'static str {
        match self {
            OperationKind::Query => "query",
            OperationKind::Mutation => "mutation",
            OperationKind::Subscription => "subscription",
        }
    }
}

/// The operation a request selects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Operation {
    pub kind: OperationKind,
    /// Its name in the document (anonymous operations have none).
    pub name: Option<String>,
}

/// The document's syntax tree, parsed within the limits for untrusted input; `None` when it has
/// errors or is over the limits.
fn parse(query: &str) -> Option<apollo_parser::SyntaxTree> {
    let tree = Parser::new(query)
        .recursion_limit(RECURSION_LIMIT)
        .token_limit(TOKEN_LIMIT)
        .parse();
    tree.errors().next().is_none().then_some(tree)
}

/// Whether a token means anything (ignored tokens: whitespace, comments, commas).
fn significant(kind: TokenKind) -> bool {
    !matches!(
        kind,
        TokenKind::Whitespace | TokenKind::Comment | TokenKind::Comma | TokenKind::Eof
    )
}

/// The operation `operation_name` selects in `query` (the only one when no name is given).
/// `None` when the document does not parse, is over the limits, or selects nothing: such a
/// request is not cached and the upstream reports the problem itself.
pub fn analyse(query: &str, operation_name: Option<&str>) -> Option<Operation> {
    let tree = parse(query)?;
    let mut chosen = None;
    let mut count = 0;
    for definition in tree.document().definitions() {
        let cst::Definition::OperationDefinition(op) = definition else {
            continue;
        };
        count += 1;
        let name = op.name().map(|n| n.text().to_string());
        let selected = match operation_name {
            Some(wanted) => name.as_deref() == Some(wanted),
            None => true,
        };
        if selected {
            if chosen.is_some() {
                // Two candidates: ambiguous (several unnamed, or a duplicated name).
                return None;
            }
            chosen = Some(Operation {
                kind: kind_of(&op),
                name,
            });
        }
    }
    if operation_name.is_none() && count > 1 {
        return None;
    }
    chosen
}

/// A document reduced to what it means for safelisting, as Apollo Router matches freeform
/// operations: ignored tokens (whitespace, comments, commas) dropped and top-level definitions
/// (operations, fragments) in sorted order. `None` when it does not parse or is over the limits.
pub fn normalized(query: &str) -> Option<String> {
    normalized_within(query, TOKEN_LIMIT)
}

/// Significant tokens (not whitespace, comments or commas) in a document, counting no further
/// than `stop_after + 1`.
pub fn significant_tokens(query: &str, stop_after: usize) -> usize {
    let mut count = 0;
    for token in Lexer::new(query) {
        let Ok(token) = token else {
            continue;
        };
        if significant(token.kind()) {
            count += 1;
            if count > stop_after {
                break;
            }
        }
    }
    count
}

/// As [`normalized`], for a document of at most `max_tokens` significant tokens: a longer one
/// cannot match anything listed, and is not parsed at all.
pub fn normalized_within(query: &str, max_tokens: usize) -> Option<String> {
    if significant_tokens(query, max_tokens) > max_tokens {
        return None;
    }
    let tree = parse(query)?;
    let mut definitions: Vec<String> = Vec::new();
    for definition in tree.document().definitions() {
        let text = definition.syntax().text().to_string();
        let mut out = String::with_capacity(text.len());
        for token in Lexer::new(&text) {
            let token = token.ok()?;
            if significant(token.kind()) {
                // One space between significant tokens keeps `a b` apart from `ab`.
                if !out.is_empty() {
                    out.push(' ');
                }
                out.push_str(token.data());
            }
        }
        definitions.push(out);
    }
    definitions.sort_unstable();
    Some(definitions.join(" "))
}

fn kind_of(op: &cst::OperationDefinition) -> OperationKind {
    match op.operation_type() {
        Some(t) if t.mutation_token().is_some() => OperationKind::Mutation,
        Some(t) if t.subscription_token().is_some() => OperationKind::Subscription,
        // `{ ... }` shorthand and `query` are queries.
        _ => OperationKind::Query,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_and_names() {
        let q = |s: &str, n: Option<&str>| analyse(s, n).map(|o| (o.kind, o.name));
        assert_eq!(q("{ a }", None), Some((OperationKind::Query, None)));
        assert_eq!(
            q("query Q { a }", None),
            Some((OperationKind::Query, Some("Q".into())))
        );
        let doc = "query A { a } mutation B { b } fragment F on T { x }";
        assert_eq!(
            q(doc, Some("B")).map(|o| o.0),
            Some(OperationKind::Mutation)
        );
        assert_eq!(q(doc, Some("A")).map(|o| o.0), Some(OperationKind::Query));
        assert_eq!(q(doc, None), None, "ambiguous");
        assert_eq!(q(doc, Some("C")), None);
        assert_eq!(
            q("subscription S { s }", None).map(|o| o.0),
            Some(OperationKind::Subscription)
        );
        // A string containing "mutation" is not a mutation.
        assert_eq!(
            q(r#"query { a(x: "mutation { b }") }"#, None).map(|o| o.0),
            Some(OperationKind::Query)
        );
        assert_eq!(q("query {", None), None);
    }

    #[test]
    fn normalization_ignores_layout_comments_commas_and_definition_order() {
        let listed = "query Q($id: ID!) { item(id: $id) { ...F } }\nfragment F on Item { a b }";
        let reformatted = "# a comment\nfragment F on Item {\n  a,\n  b\n}\n\nquery Q( $id : ID! ) {\n  item(id: $id) { ...F }\n}";
        assert_eq!(normalized(listed), normalized(reformatted));
        assert!(normalized(listed).is_some());
        // What changes the operation still counts, strings included.
        assert_ne!(normalized("{ a b }"), normalized("{ ab }"));
        assert_ne!(
            normalized(r#"{ a(x: "p q") }"#),
            normalized(r#"{ a(x: "p  q") }"#)
        );
        assert_ne!(normalized("query Q { a }"), normalized("query Q { b }"));
        assert_eq!(normalized("query {"), None);
        // Longer than anything listed: not parsed.
        assert_eq!(significant_tokens("{ a b c }", 3), 4);
        assert_eq!(normalized_within("{ a b c }", 3), None);
        assert!(normalized_within("{ a b c }", 5).is_some());
    }

    #[test]
    fn hostile_nesting_is_refused_not_a_crash() {
        let deep = format!("{}{}", "{ a ".repeat(5000), "}".repeat(5000));
        assert_eq!(analyse(&deep, None), None);
    }
}
