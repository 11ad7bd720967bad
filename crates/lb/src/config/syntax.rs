//! nginx configuration syntax: tokens, quoting, comments, blocks and `include`.
//!
//! The output is a tree of [`Directive`]s, each remembering the file and line it
//! came from so that every later error can name them.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Where a directive was written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Location {
    pub file: Arc<PathBuf>,
    pub line: usize,
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.file.display(), self.line)
    }
}

/// One directive: `name arg...;` or `name arg... { children }`.
#[derive(Debug, Clone)]
pub struct Directive {
    pub name: String,
    pub args: Vec<String>,
    pub block: Option<Vec<Directive>>,
    pub loc: Location,
}

#[derive(Debug, thiserror::Error)]
pub enum SyntaxError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{loc}: {msg}")]
    Invalid { loc: Location, msg: String },
    #[error("{loc}: include nesting deeper than {MAX_INCLUDE_DEPTH} (include loop?)")]
    IncludeDepth { loc: Location },
}

const MAX_INCLUDE_DEPTH: usize = 16;

/// Reads `path` and every file it includes into a directive tree.
pub fn parse_file(path: &Path) -> Result<Vec<Directive>, SyntaxError> {
    parse_file_at_depth(path, 0)
}

fn parse_file_at_depth(path: &Path, depth: usize) -> Result<Vec<Directive>, SyntaxError> {
    let text = std::fs::read_to_string(path).map_err(|source| SyntaxError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let file = Arc::new(path.to_path_buf());
    let tokens = tokenize(&text, &file)?;
    let mut parser = Parser {
        tokens,
        pos: 0,
        file,
        depth,
    };
    parser.block(false)
}

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Word(String),
    Semi,
    Open,
    Close,
}

struct Token {
    tok: Tok,
    line: usize,
}

fn tokenize(text: &str, file: &Arc<PathBuf>) -> Result<Vec<Token>, SyntaxError> {
    let mut out = Vec::new();
    let mut chars = text.chars().peekable();
    let mut line = 1;
    while let Some(&c) = chars.peek() {
        match c {
            '\n' => {
                line += 1;
                chars.next();
            }
            c if c.is_whitespace() => {
                chars.next();
            }
            '#' => {
                while chars.peek().is_some_and(|&c| c != '\n') {
                    chars.next();
                }
            }
            ';' | '{' | '}' => {
                chars.next();
                let tok = match c {
                    ';' => Tok::Semi,
                    '{' => Tok::Open,
                    _ => Tok::Close,
                };
                out.push(Token { tok, line });
            }
            '"' | '\'' => {
                let start = line;
                chars.next();
                let word =
                    quoted(&mut chars, c, &mut line).ok_or_else(|| SyntaxError::Invalid {
                        loc: Location {
                            file: file.clone(),
                            line: start,
                        },
                        msg: format!("unterminated {c}quoted{c} string"),
                    })?;
                out.push(Token {
                    tok: Tok::Word(word),
                    line: start,
                });
            }
            _ => {
                let word = bare(&mut chars);
                out.push(Token {
                    tok: Tok::Word(word),
                    line,
                });
            }
        }
    }
    Ok(out)
}

/// Reads a quoted string after its opening quote; `None` if it never closes.
fn quoted(
    chars: &mut std::iter::Peekable<std::str::Chars<'_>>,
    quote: char,
    line: &mut usize,
) -> Option<String> {
    let mut word = String::new();
    loop {
        let c = chars.next()?;
        match c {
            c if c == quote => return Some(word),
            '\\' => {
                let next = chars.next()?;
                unescape(next, &mut word);
                if next == '\n' {
                    *line += 1;
                }
            }
            '\n' => {
                *line += 1;
                word.push(c);
            }
            c => word.push(c),
        }
    }
}

/// nginx keeps unknown escapes verbatim (so `\x00` reaches the directive).
fn unescape(c: char, word: &mut String) {
    match c {
        '"' | '\'' | '\\' => word.push(c),
        'n' => word.push('\n'),
        't' => word.push('\t'),
        'r' => word.push('\r'),
        other => {
            word.push('\\');
            word.push(other);
        }
    }
}

fn bare(chars: &mut std::iter::Peekable<std::str::Chars<'_>>) -> String {
    let mut word = String::new();
    while let Some(&c) = chars.peek() {
        if c.is_whitespace() || matches!(c, ';' | '{' | '}') {
            break;
        }
        chars.next();
        if c == '\\' {
            if let Some(next) = chars.next() {
                unescape(next, &mut word);
            }
        } else {
            word.push(c);
        }
    }
    word
}

struct Parser {
    tokens: Vec<Token>,
    pos: usize,
    file: Arc<PathBuf>,
    depth: usize,
}

impl Parser {
    fn loc(&self, line: usize) -> Location {
        Location {
            file: self.file.clone(),
            line,
        }
    }

    fn last_line(&self) -> usize {
        self.tokens.last().map_or(1, |t| t.line)
    }

    fn invalid(&self, line: usize, msg: impl Into<String>) -> SyntaxError {
        SyntaxError::Invalid {
            loc: self.loc(line),
            msg: msg.into(),
        }
    }

    /// Parses directives until `}` (when `nested`) or the end of the file.
    fn block(&mut self, nested: bool) -> Result<Vec<Directive>, SyntaxError> {
        let mut out = Vec::new();
        loop {
            let Some(token) = self.tokens.get(self.pos) else {
                if nested {
                    return Err(
                        self.invalid(self.last_line(), "unexpected end of file, expecting \"}\"")
                    );
                }
                return Ok(out);
            };
            let line = token.line;
            match &token.tok {
                Tok::Close if nested => {
                    self.pos += 1;
                    return Ok(out);
                }
                Tok::Close => return Err(self.invalid(line, "unexpected \"}\"")),
                Tok::Semi => return Err(self.invalid(line, "unexpected \";\"")),
                Tok::Open => return Err(self.invalid(line, "unexpected \"{\"")),
                Tok::Word(name) => {
                    let name = name.clone();
                    self.pos += 1;
                    let directive = self.directive(name, line)?;
                    if directive.name == "include" && directive.block.is_none() {
                        out.extend(self.include(&directive)?);
                    } else {
                        out.push(directive);
                    }
                }
            }
        }
    }

    fn directive(&mut self, name: String, line: usize) -> Result<Directive, SyntaxError> {
        let mut args = Vec::new();
        loop {
            let Some(token) = self.tokens.get(self.pos) else {
                return Err(self.invalid(
                    self.last_line(),
                    format!("unexpected end of file, expecting \";\" or \"{{\" after \"{name}\""),
                ));
            };
            self.pos += 1;
            match &token.tok {
                Tok::Word(w) => args.push(w.clone()),
                Tok::Semi => {
                    return Ok(Directive {
                        name,
                        args,
                        block: None,
                        loc: self.loc(line),
                    })
                }
                Tok::Open => {
                    let block = self.block(true)?;
                    return Ok(Directive {
                        name,
                        args,
                        block: Some(block),
                        loc: self.loc(line),
                    });
                }
                Tok::Close => {
                    let at = token.line;
                    return Err(self.invalid(
                        at,
                        format!("unexpected \"}}\" in \"{name}\" (missing \";\"?)"),
                    ));
                }
            }
        }
    }

    /// Expands `include PATTERN;`, relative to the including file's directory.
    fn include(&self, d: &Directive) -> Result<Vec<Directive>, SyntaxError> {
        let [pattern] = d.args.as_slice() else {
            return Err(self.invalid(d.loc.line, "\"include\" takes exactly one argument"));
        };
        if self.depth >= MAX_INCLUDE_DEPTH {
            return Err(SyntaxError::IncludeDepth { loc: d.loc.clone() });
        }
        let base = self.file.parent().unwrap_or(Path::new("."));
        let full = base.join(pattern);
        let full_str = full.to_string_lossy();
        let is_glob = pattern.contains(['*', '?', '[']);
        let paths: Vec<PathBuf> = if is_glob {
            let entries = glob::glob(&full_str).map_err(|e| {
                self.invalid(
                    d.loc.line,
                    format!("bad include pattern \"{pattern}\": {e}"),
                )
            })?;
            let mut paths = Vec::new();
            for entry in entries {
                let path = entry
                    .map_err(|e| self.invalid(d.loc.line, format!("include \"{pattern}\": {e}")))?;
                paths.push(path);
            }
            paths.sort();
            paths
        } else {
            vec![full.clone()]
        };
        let mut out = Vec::new();
        for path in paths {
            let nested = parse_file_at_depth(&path, self.depth + 1).map_err(|e| match e {
                SyntaxError::Read { path, source } => self.invalid(
                    d.loc.line,
                    format!("include \"{}\": {source}", path.display()),
                ),
                other => other,
            })?;
            out.extend(nested);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_str(text: &str) -> Result<Vec<Directive>, SyntaxError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lb.conf");
        std::fs::write(&path, text).unwrap();
        parse_file(&path)
    }

    #[test]
    fn tokens_quotes_comments_blocks() {
        let tree = parse_str(
            "# top\nstream {\n  log_format x '$remote_addr \"q\"' \"a\\tb\"; # trailing\n  server { listen 1:2; }\n}\n",
        )
        .unwrap();
        assert_eq!(tree.len(), 1);
        let stream = tree[0].block.as_ref().unwrap();
        assert_eq!(stream[0].name, "log_format");
        assert_eq!(stream[0].args, vec!["x", "$remote_addr \"q\"", "a\tb"]);
        assert_eq!(stream[0].loc.line, 3);
        let server = stream[1].block.as_ref().unwrap();
        assert_eq!(server[0].args, vec!["1:2"]);
        assert_eq!(server[0].loc.line, 4);
    }

    #[test]
    fn unknown_escapes_survive() {
        let tree = parse_str("send \"\\x00\\x01ab\";").unwrap();
        assert_eq!(tree[0].args, vec!["\\x00\\x01ab"]);
    }

    #[test]
    fn errors_name_file_and_line() {
        let cases = [
            ("a b;\nc {\n", "lb.conf:2: unexpected end of file"),
            ("a b;\n}\n", "lb.conf:2: unexpected \"}\""),
            ("a \"open;\n\n", "lb.conf:1: unterminated"),
            (
                "a b\n",
                "lb.conf:1: unexpected end of file, expecting \";\"",
            ),
            ("x { a b }", "lb.conf:1: unexpected \"}\" in \"a\""),
        ];
        for (text, want) in cases {
            let err = parse_str(text).unwrap_err().to_string();
            assert!(err.contains(want), "{text:?}: got {err}");
        }
    }

    #[test]
    fn include_glob_relative_sorted() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("conf.d")).unwrap();
        std::fs::write(dir.path().join("conf.d/b.conf"), "b 2;\n").unwrap();
        std::fs::write(dir.path().join("conf.d/a.conf"), "\na 1;\n").unwrap();
        std::fs::write(dir.path().join("conf.d/skip.txt"), "bad").unwrap();
        let main = dir.path().join("main.conf");
        std::fs::write(&main, "stream {\n include conf.d/*.conf;\n}\n").unwrap();
        let tree = parse_file(&main).unwrap();
        let stream = tree[0].block.as_ref().unwrap();
        let names: Vec<_> = stream.iter().map(|d| d.name.as_str()).collect();
        assert_eq!(names, ["a", "b"]);
        assert!(stream[0].loc.file.ends_with("conf.d/a.conf"));
        assert_eq!(stream[0].loc.line, 2);
    }

    #[test]
    fn include_missing_and_loops_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let main = dir.path().join("main.conf");
        std::fs::write(&main, "\ninclude nope.conf;\n").unwrap();
        let err = parse_file(&main).unwrap_err().to_string();
        assert!(
            err.contains("main.conf:2: include") && err.contains("nope.conf"),
            "{err}"
        );
        std::fs::write(&main, "include main.conf;\n").unwrap();
        let err = parse_file(&main).unwrap_err().to_string();
        assert!(err.contains("include nesting"), "{err}");
    }
}
