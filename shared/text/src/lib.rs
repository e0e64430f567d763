//! Text rules that every stage must apply identically. Preprocess strips invisible characters
//! from a query before anything else reads it; moderation strips the same ones before its rules
//! match, which matters most for model output: it reaches moderation without passing
//! preprocess, so a completion that hid a word behind bidi controls would otherwise slip past.

/// Whether `c` is an invisible format character: it renders as nothing (or only reorders what
/// is around it) yet splits words for a matcher. Control characters (`Cc`) are not included:
/// whether `\n` and `\t` survive is each stage's choice.
///
/// - soft hyphen U+00AD, Arabic letter mark U+061C, Mongolian vowel separator U+180E;
/// - zero-width space / non-joiner / joiner, LRM, RLM: U+200B–U+200F;
/// - bidi embeddings and overrides U+202A–U+202E; bidi isolates U+2066–U+2069;
/// - word joiner and invisible operators U+2060–U+2064; deprecated format controls
///   U+206A–U+206F;
/// - the BOM / zero-width no-break space U+FEFF; interlinear annotation controls U+FFF9–U+FFFB.
pub fn is_invisible(c: char) -> bool {
    matches!(
        c,
        '\u{00AD}'
            | '\u{061C}'
            | '\u{180E}'
            | '\u{200B}'..='\u{200F}'
            | '\u{202A}'..='\u{202E}'
            | '\u{2060}'..='\u{2064}'
            | '\u{2066}'..='\u{206F}'
            | '\u{FEFF}'
            | '\u{FFF9}'..='\u{FFFB}'
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bidi_controls_and_zero_width_characters_are_invisible() {
        for c in
            ['\u{061C}', '\u{202A}', '\u{202E}', '\u{2066}', '\u{2069}', '\u{FFF9}', '\u{FFFB}', '\u{200B}', '\u{FEFF}']
        {
            assert!(is_invisible(c), "U+{:04X}", c as u32);
        }
        for c in ['a', ' ', '\n', '\t', '\u{0000}', '\u{2065}', 'é'] {
            assert!(!is_invisible(c), "U+{:04X}", c as u32);
        }
    }
}
