//! Text normalization: what every later stage (moderation rules, the tokenizer, the model) can
//! rely on about a query's text.
//!
//! In order:
//! 1. Line breaks unified: `\r\n`, `\r`, NEL (U+0085) and U+2028 become `\n`; the paragraph
//!    separator U+2029 becomes a blank line.
//! 2. Invisible characters removed: control characters (Unicode `Cc`, C0 and C1) except `\n`
//!    and `\t`; zero-width and format characters — soft hyphen U+00AD, Arabic letter mark
//!    U+061C, Mongolian vowel separator U+180E, U+200B–U+200F (zero-width space / non-joiner /
//!    joiner, LRM, RLM), bidi embeddings and overrides U+202A–U+202E, U+2060–U+2064 (word joiner,
//!    invisible operators), bidi isolates U+2066–U+2069, deprecated format controls
//!    U+206A–U+206F, the BOM / zero-width no-break space U+FEFF, interlinear annotation controls
//!    U+FFF9–U+FFFB. Removing them *before* NFKC lets a letter and a combining mark that an
//!    invisible character kept apart compose.
//! 3. Unicode NFKC: ligatures (`ﬁ` → `fi`), full-width forms (`ＡＢＣ１２３` → `ABC123`),
//!    compatibility spaces (NBSP, ideographic space → space), superscripts and the like.
//! 4. Whitespace: every other whitespace character (tab included) counts as a space; runs of
//!    spaces become one; spaces at the ends of lines go; a single newline stays a newline;
//!    two or more newlines (blank lines, possibly holding spaces) become exactly one blank line
//!    (`\n\n`), so paragraphs stay paragraphs.
//! 5. Trimmed at both ends.
//!
//! The result is a `String`, so always valid UTF-8 (the protobuf decoder already refused
//! invalid UTF-8 in the input).
use unicode_normalization::UnicodeNormalization;

/// Whether `c` is removed outright: a control character other than `\n`/`\t` (Cc: U+0000–U+001F,
/// U+007F–U+009F), or an invisible format character ([`millrace_text::is_invisible`], the list
/// moderation strips too).
pub fn is_removed(c: char) -> bool {
    (c.is_control() && c != '\n' && c != '\t') || millrace_text::is_invisible(c)
}

/// Normalizes `text` as described in the module docs.
pub fn normalize(text: &str) -> String {
    // 1 + 2: line breaks and invisible characters, in one pass.
    let mut stripped = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\r' => {
                if chars.peek() == Some(&'\n') {
                    chars.next();
                }
                stripped.push('\n');
            }
            '\u{0085}' | '\u{2028}' => stripped.push('\n'),
            '\u{2029}' => stripped.push_str("\n\n"),
            c if is_removed(c) => {}
            c => stripped.push(c),
        }
    }
    // 3: NFKC is the identity on ASCII, the common case.
    let normalized = if stripped.is_ascii() { stripped } else { stripped.nfkc().collect::<String>() };
    collapse_whitespace(&normalized)
}

/// Step 4 and 5: single spaces, no trailing spaces on lines, at most one blank line, trimmed.
fn collapse_whitespace(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    // Whitespace seen since the last visible character, not yet written.
    let mut pending_space = false;
    let mut pending_newlines = 0usize;
    for c in text.chars() {
        if c == '\n' {
            pending_newlines += 1;
            pending_space = false; // spaces before a line break are trailing spaces
        } else if c.is_whitespace() {
            pending_space = true;
        } else {
            if !out.is_empty() {
                match pending_newlines {
                    0 if pending_space => out.push(' '),
                    0 => {}
                    1 => out.push('\n'),
                    _ => out.push_str("\n\n"),
                }
            }
            // Leading whitespace (nothing written yet) is dropped: trimmed.
            pending_space = false;
            pending_newlines = 0;
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nfkc_folds_ligatures_full_width_and_compatibility_forms() {
        assert_eq!(normalize("ﬁnance ﬂow"), "finance flow");
        assert_eq!(normalize("ＡＢＣ１２３！"), "ABC123!");
        assert_eq!(normalize("x² and ½"), "x2 and 1⁄2");
        assert_eq!(normalize("Ⅻ ㎏"), "XII kg");
        // Canonical composition: e + combining acute → é.
        assert_eq!(normalize("e\u{0301}"), "\u{00E9}");
        // Meaning intact for scripts that NFKC leaves alone.
        assert_eq!(normalize("Привет, 世界! مرحبا"), "Привет, 世界! مرحبا");
        assert_eq!(normalize("crab 🦀 emoji"), "crab 🦀 emoji");
    }

    #[test]
    fn zero_width_bidi_and_soft_hyphens_are_removed() {
        assert_eq!(normalize("pa\u{200B}ss\u{200C}wo\u{200D}rd"), "password");
        assert_eq!(normalize("\u{FEFF}hello\u{2060}"), "hello");
        assert_eq!(normalize("abc\u{202E}fed\u{202C}"), "abcfed");
        assert_eq!(normalize("\u{2066}iso\u{2069}late \u{200E}mark\u{200F}"), "isolate mark");
        assert_eq!(normalize("co\u{00AD}operate"), "cooperate");
        // Removed before NFKC: the mark still composes with its letter.
        assert_eq!(normalize("e\u{200B}\u{0301}"), "\u{00E9}");
        assert_eq!(normalize("\u{200B}\u{200C}\u{200D}\u{FEFF}"), "");
    }

    #[test]
    fn control_characters_are_removed_but_newlines_and_tabs_kept_as_whitespace() {
        assert_eq!(normalize("a\u{0000}b\u{0007}c\u{001B}[31md\u{007F}e"), "abc[31mde");
        assert_eq!(normalize("C1\u{0080}\u{009F}ok"), "C1ok");
        assert_eq!(normalize("col1\tcol2"), "col1 col2");
        assert_eq!(normalize("line1\r\nline2\rline3\u{2028}line4"), "line1\nline2\nline3\nline4");
    }

    #[test]
    fn whitespace_runs_collapse_and_paragraphs_survive() {
        assert_eq!(normalize("  hello    world \t "), "hello world");
        assert_eq!(normalize("a\u{00A0}\u{3000}\u{2003}b"), "a b");
        assert_eq!(normalize("para one.  \n\n\n\n   para two.\nsame para"), "para one.\n\npara two.\nsame para");
        assert_eq!(normalize("one\n \t \ntwo"), "one\n\ntwo");
        assert_eq!(normalize("first\u{2029}second"), "first\n\nsecond");
        assert_eq!(normalize("\n\n  leading and trailing \n\n"), "leading and trailing");
        assert_eq!(normalize(" \t\n\r\n "), "");
    }

    #[test]
    fn normalizing_twice_changes_nothing() {
        for s in ["ﬁ  x\u{200B}y\n\n\nz ", "ＡＢＣ \t１２３", "plain text", "a\r\n\r\nb"] {
            let once = normalize(s);
            assert_eq!(normalize(&once), once);
        }
    }
}
