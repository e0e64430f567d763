//! Light normalization of a text before rule matching: it undoes the cheap obfuscations people
//! use to slip words past filters, without inventing words that ordinary text does not contain.
//!
//! 1. Unicode compatibility decomposition (NFKD, which covers NFKC's folding of full-width and
//!    mathematical letters, ligatures…), lower-casing, then dropping combining marks (`fück` →
//!    `fuck`) and invisible format characters (zero-width and bidi controls, soft hyphens: the
//!    list `millrace_text::is_invisible` shares with preprocess).
//! 2. Splitting into words: runs of letters and digits, plus the leet symbols `@` and `$`, and
//!    `!` between two word characters (`sh!t`). Apostrophes vanish (`don't` → `dont`).
//! 3. Separated single letters: three or more one-letter pieces with the same single separator
//!    character between each (`f u c k`, `f.u.c.k`, `k-y-s`) become one word. The words as they
//!    were before this step are kept too (`u r a loser` is four words), and rules see both.
//! 4. Leetspeak, only in words that contain a letter (so `2024` and `$5` stay as they are):
//!    `0→o 3→e 4→a 5→s 7→t @→a $→s !→i`; `1` and `|` may stand for `i` or `l`, so such a word
//!    gets both readings.
//! 5. Elongation: a word with a run of three or more identical letters (`fuuuck`) also gets its
//!    *squeezed* reading (every run collapsed to one letter), which rules compare with their
//!    keywords' squeezed readings.
//!
//! Word boundaries are what keep this honest: rules compare whole words, so `Scunthorpe`,
//! `class`, `assassin`, `cocktail` or `therapist` never contain a listed word.
use unicode_normalization::UnicodeNormalization;
use unicode_normalization::char::is_combining_mark;

/// One word of a normalized text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Word {
    /// The word's readings: the first with `1`/`|` read as `i`, a second (when it differs)
    /// with them read as `l`.
    pub forms: Vec<String>,
    /// Squeezed readings (runs of a letter collapsed to one), only for elongated words.
    pub squeezed: Vec<String>,
}

impl Word {
    pub fn is_elongated(&self) -> bool {
        !self.squeezed.is_empty()
    }
}

/// A text as the rules see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Normalized {
    /// Step 1 only: decomposed, lower-cased, marks and invisibles dropped; punctuation kept.
    pub folded: String,
    pub words: Vec<Word>,
    /// The first reading of every word, joined by single spaces: de-obfuscated text for
    /// regexes and the classifier.
    pub joined: String,
    /// When step 3 joined single letters into a word, the words without that step (`u r a
    /// loser` must still read as four words), and their `joined` text.
    pub unjoined: Option<(Vec<Word>, String)>,
}

impl Normalized {
    /// Every reading of the text's words: with spelled-out letters joined, and without.
    pub fn word_sequences(&self) -> impl Iterator<Item = &[Word]> {
        std::iter::once(self.words.as_slice()).chain(self.unjoined.as_ref().map(|(w, _)| w.as_slice()))
    }

    /// Every de-obfuscated text: `joined`, and the unjoined one when there is one.
    pub fn joined_texts(&self) -> impl Iterator<Item = &str> {
        std::iter::once(self.joined.as_str()).chain(self.unjoined.as_ref().map(|(_, j)| j.as_str()))
    }
}

/// Step 1: compatibility decomposition, lower case, no combining marks or invisible characters.
pub fn fold(text: &str) -> String {
    text.nfkd()
        .flat_map(char::to_lowercase)
        .filter(|&c| !is_combining_mark(c) && !millrace_text::is_invisible(c))
        .collect()
}

fn is_word_char(c: char) -> bool {
    c.is_alphanumeric() || c == '@' || c == '$'
}

fn is_apostrophe(c: char) -> bool {
    matches!(c, '\'' | '\u{2019}' | '\u{2018}' | '`' | '\u{00B4}')
}

/// Characters that may separate the letters of one spelled-out word (`f.u.c.k`).
fn is_letter_separator(c: char) -> bool {
    c.is_whitespace() || matches!(c, '.' | '-' | '_' | '*' | '/' | '+' | '~' | ',' | ':')
}

/// Normalizes `text` (see the module docs).
pub fn normalize(text: &str) -> Normalized {
    let folded = fold(text);
    let pieces = pieces(&folded);
    let raw = join_spelled_out(&pieces);
    let words: Vec<Word> = raw.iter().map(|w| word(w)).collect();
    let joined = join(&words);
    let unjoined = (raw.len() != pieces.len()).then(|| {
        let words: Vec<Word> = pieces.iter().map(|p| word(&p.text)).collect();
        let joined = join(&words);
        (words, joined)
    });
    Normalized { folded, words, joined, unjoined }
}

fn join(words: &[Word]) -> String {
    words.iter().map(|w| w.forms[0].as_str()).collect::<Vec<_>>().join(" ")
}

/// Normalizes a rule's keyword: the same folding and splitting, but no leetspeak and no
/// letter joining (rules are written plainly). Empty when it has no word characters.
pub fn keyword_words(keyword: &str) -> Vec<String> {
    pieces(&fold(keyword)).into_iter().map(|p| p.text).collect()
}

/// A run of word characters and the separator text that follows it.
#[derive(Debug)]
struct Piece {
    text: String,
    separator: String,
}

fn pieces(folded: &str) -> Vec<Piece> {
    let chars: Vec<char> = folded.chars().collect();
    let mut out: Vec<Piece> = Vec::new();
    let mut current = String::new();
    let mut separator = String::new();
    for (i, &c) in chars.iter().enumerate() {
        if is_apostrophe(c) {
            continue;
        }
        let inside = |c: char| {
            c == '!'
                && i > 0
                && chars.get(i + 1).is_some_and(|&n| n.is_alphanumeric())
                && chars[i - 1].is_alphanumeric()
        };
        if is_word_char(c) || inside(c) {
            if !separator.is_empty() {
                // A separator has ended the previous word (it only grows after one).
                out.push(Piece { text: std::mem::take(&mut current), separator: std::mem::take(&mut separator) });
            }
            current.push(c);
        } else if !current.is_empty() {
            separator.push(c);
        }
    }
    if !current.is_empty() {
        out.push(Piece { text: current, separator });
    }
    out
}

fn is_single_letter(p: &Piece) -> bool {
    let mut chars = p.text.chars();
    matches!((chars.next(), chars.next()), (Some(c), None) if c.is_alphabetic() || c == '@' || c == '$')
}

/// Step 3: three or more single letters with one separator character between each become one
/// word; everything else stays a word of its own.
fn join_spelled_out(pieces: &[Piece]) -> Vec<String> {
    let mut words = Vec::with_capacity(pieces.len());
    let mut i = 0;
    while i < pieces.len() {
        // One separator throughout: in `a l-o-s-e-r` the article stays a word of its own.
        let separator = pieces[i].separator.as_str();
        let mut end = i;
        while end + 1 < pieces.len()
            && is_single_letter(&pieces[end])
            && is_single_letter(&pieces[end + 1])
            && single_separator(&pieces[end].separator)
            && pieces[end].separator == separator
        {
            end += 1;
        }
        if end - i >= 2 {
            words.push(pieces[i..=end].iter().map(|p| p.text.as_str()).collect());
            i = end + 1;
        } else {
            words.push(pieces[i].text.clone());
            i += 1;
        }
    }
    words
}

fn single_separator(separator: &str) -> bool {
    let mut chars = separator.chars();
    matches!((chars.next(), chars.next()), (Some(c), None) if is_letter_separator(c))
}

/// Steps 4 and 5 for one word.
fn word(raw: &str) -> Word {
    let forms = if raw.chars().any(char::is_alphabetic) {
        let as_i = deleet(raw, 'i');
        let as_l = deleet(raw, 'l');
        if as_i == as_l { vec![as_i] } else { vec![as_i, as_l] }
    } else {
        vec![raw.to_owned()]
    };
    let squeezed = if has_run(&forms[0], 3) {
        let mut s: Vec<String> = forms.iter().map(|f| squeeze(f)).collect();
        s.dedup();
        s
    } else {
        Vec::new()
    };
    Word { forms, squeezed }
}

fn deleet(raw: &str, one: char) -> String {
    raw.chars()
        .map(|c| match c {
            '0' => 'o',
            '1' | '|' => one,
            '3' => 'e',
            '4' | '@' => 'a',
            '5' | '$' => 's',
            '7' => 't',
            '!' => 'i',
            c => c,
        })
        .collect()
}

/// Whether `s` has `n` or more identical characters in a row.
fn has_run(s: &str, n: usize) -> bool {
    let mut run = 0;
    let mut last = None;
    for c in s.chars() {
        run = if Some(c) == last { run + 1 } else { 1 };
        if run >= n {
            return true;
        }
        last = Some(c);
    }
    false
}

/// Every run of one character collapsed to a single one (`asshole` → `ashole`).
pub fn squeeze(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut last = None;
    for c in s.chars() {
        if Some(c) != last {
            out.push(c);
        }
        last = Some(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(text: &str) -> Vec<String> {
        normalize(text).words.into_iter().map(|w| w.forms[0].clone()).collect()
    }

    #[test]
    fn folding_undoes_width_case_marks_and_invisibles() {
        assert_eq!(fold("ＦＵＣＫ"), "fuck");
        assert_eq!(fold("𝐟𝐮𝐜𝐤"), "fuck");
        assert_eq!(fold("Fück"), "fuck");
        assert_eq!(fold("fu\u{200B}ck"), "fuck");
        assert_eq!(fold("ﬁne Café"), "fine cafe");
    }

    #[test]
    fn leetspeak_is_read_only_in_words_with_letters() {
        assert_eq!(words("sh1t @sshole $h!t b!tch"), ["shit", "asshole", "shit", "bitch"]);
        assert_eq!(
            words("it costs $5 in 2024, call 555-0100"),
            ["it", "costs", "$5", "in", "2024", "call", "555", "0100"]
        );
        let ki11 = &normalize("ki11").words[0];
        assert_eq!(ki11.forms, ["kiii", "kill"]);
        assert_eq!(words("1d10t"), ["idiot"]);
    }

    #[test]
    fn spelled_out_words_are_joined_but_ordinary_single_letters_are_not() {
        assert_eq!(words("f u c k you"), ["fuck", "you"]);
        assert_eq!(words("f.u.c.k off"), ["fuck", "off"]);
        assert_eq!(words("k.y.s"), ["kys"]);
        assert_eq!(words("f-u-c-k"), ["fuck"]);
        assert_eq!(words("I am a cat"), ["i", "am", "a", "cat"]);
        assert_eq!(words("plan a, b or c"), ["plan", "a", "b", "or", "c"]);
        assert_eq!(words("a b"), ["a", "b"]);
        assert_eq!(words("you are a l-o-s-e-r"), ["you", "are", "a", "loser"]);
        let n = normalize("u r a l0ser");
        assert_eq!(n.joined, "ura loser");
        assert_eq!(n.joined_texts().collect::<Vec<_>>(), ["ura loser", "u r a loser"]);
        assert_eq!(n.word_sequences().count(), 2);
        assert_eq!(normalize("no letters joined").word_sequences().count(), 1);
    }

    #[test]
    fn apostrophes_vanish_and_punctuation_separates() {
        assert_eq!(words("Don't; I’ll go!"), ["dont", "ill", "go"]);
        assert_eq!(normalize("Hello,   WORLD!!").joined, "hello world");
    }

    #[test]
    fn elongated_words_get_a_squeezed_reading() {
        let n = normalize("fuuuuck sooo good");
        assert_eq!(n.words[0].squeezed, ["fuck"]);
        assert_eq!(n.words[1].squeezed, ["so"]);
        assert!(!n.words[2].is_elongated(), "a double letter is ordinary spelling");
        assert_eq!(squeeze("asshole"), "ashole");
    }

    #[test]
    fn keywords_are_folded_and_split_without_leet() {
        assert_eq!(keyword_words("Self-Harm"), ["self", "harm"]);
        assert_eq!(keyword_words("I'll kill you"), ["ill", "kill", "you"]);
        assert_eq!(keyword_words("..."), Vec::<String>::new());
    }
}
