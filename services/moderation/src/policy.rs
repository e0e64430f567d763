//! The moderation policy: a TOML file of categories, each with an action and its rules —
//! keywords (whole words, case-insensitive, after [normalization](crate::normalize)), regexes
//! and an optional profanity-classifier threshold — plus the refusal text that replaces a
//! blocked completion. Parsing validates everything, so a policy in force is always usable.
//!
//! ```toml
//! refusal = "Sorry, I can't help with that."
//!
//! [categories.threats]
//! action = "block"                 # allow | flag | block
//! stages = ["input", "output"]     # default: both
//! keywords = ["kys", "kill yourself", "fuck*"]   # a trailing * matches a word's prefix
//! regexes = ['\bi\s+will\s+kill\s+you\b']        # case-insensitive
//! classifier_threshold = 0.95      # profanity score ≥ this → this category's action
//! ```
//!
//! Keywords are compared word by word with the text's words (so `ass` never matches `class`);
//! an elongated text word (`fuuuck`) is also compared in its squeezed reading with keywords
//! whose squeezed reading has three letters or more. Regexes run on the folded text
//! (punctuation kept) and on the de-obfuscated words; a match in either counts.
//!
//! The version of a policy is a hash of its file's bytes (FNV-1a, 64 bits, hex).
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};

use millrace_proto::v1::Verdict;
use regex::{RegexBuilder, RegexSet, RegexSetBuilder};
use serde::Deserialize;

use crate::normalize::{Normalized, Word, keyword_words, squeeze};

/// The policy shipped with the service, in force when no `--policy` file is given.
pub const DEFAULT_POLICY: &str = include_str!("../policy/default.toml");

/// Squeezed keyword readings shorter than this are not compared with elongated words
/// (`ass` squeezes to `as`, which `aaas` would otherwise match).
const MIN_SQUEEZED: usize = 3;

/// What a category's hit does to the text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Allow,
    Flag,
    Block,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Allow => "allow",
            Self::Flag => "flag",
            Self::Block => "block",
        }
    }
}

/// Where a text comes from: the user's input before the model, or its output after.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Stage {
    Input,
    Output,
}

impl Stage {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Input => "input",
            Self::Output => "output",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "input" => Some(Self::Input),
            "output" => Some(Self::Output),
            _ => None,
        }
    }
}

/// Why a policy was refused.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("not a valid policy: {0}")]
    Toml(#[from] toml::de::Error),
    #[error("`refusal` must not be empty")]
    EmptyRefusal,
    #[error("the policy has no categories")]
    NoCategories,
    #[error("category {0:?} has no rules (keywords, regexes or classifier_threshold)")]
    NoRules(String),
    #[error("category {0:?} applies to no stage")]
    NoStages(String),
    #[error("category {category:?}: keyword {keyword:?} has no letters or digits")]
    EmptyKeyword { category: String, keyword: String },
    #[error("category {category:?}: bad regex {pattern:?}: {reason}")]
    BadRegex { category: String, pattern: String, reason: String },
    #[error("category {category:?}: classifier_threshold {value} is outside [0, 1]")]
    Threshold { category: String, value: f32 },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyFile {
    refusal: String,
    #[serde(default)]
    categories: BTreeMap<String, CategoryFile>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CategoryFile {
    action: Action,
    #[serde(default)]
    description: String,
    #[serde(default = "both_stages")]
    stages: Vec<Stage>,
    #[serde(default)]
    keywords: Vec<String>,
    #[serde(default)]
    regexes: Vec<String>,
    classifier_threshold: Option<f32>,
}

fn both_stages() -> Vec<Stage> {
    vec![Stage::Input, Stage::Output]
}

#[derive(Debug)]
struct Category {
    name: String,
    action: Action,
    input: bool,
    output: bool,
    threshold: Option<f32>,
}

impl Category {
    fn applies(&self, stage: Stage) -> bool {
        match stage {
            Stage::Input => self.input,
            Stage::Output => self.output,
        }
    }
}

/// A parsed, validated, compiled policy.
pub struct Policy {
    version: String,
    refusal: String,
    categories: Vec<Category>,
    keywords: KeywordMatcher,
    regexes: RegexSet,
    /// Category and pattern of each regex of the set, in order.
    regex_rules: Vec<(usize, String)>,
}

impl fmt::Debug for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Policy")
            .field("version", &self.version)
            .field("categories", &self.categories.iter().map(|c| &c.name).collect::<Vec<_>>())
            .field("keywords", &self.keywords.phrases.len())
            .field("regexes", &self.regex_rules.len())
            .finish()
    }
}

/// The outcome of checking one text.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    /// The strongest action of the verdicts.
    pub action: Action,
    /// One verdict per category that hit; a single `allow` verdict (no category) carrying the
    /// classifier's score when none did.
    pub verdicts: Vec<Verdict>,
    pub policy_version: String,
}

impl Decision {
    /// The verdict that blocks the text, when one does (the highest score among the blocking
    /// categories).
    pub fn blocking(&self) -> Option<&Verdict> {
        self.verdicts.iter().filter(|v| v.action == Action::Block.as_str()).fold(None, |best: Option<&Verdict>, v| {
            match best {
                Some(b) if b.score >= v.score => Some(b),
                _ => Some(v),
            }
        })
    }
}

impl Policy {
    /// The shipped default policy.
    pub fn default_policy() -> Self {
        Self::parse(DEFAULT_POLICY).expect("the shipped default policy is valid")
    }

    /// Reads and parses a policy file.
    pub fn load(path: &Path) -> Result<Self, PolicyError> {
        let text =
            std::fs::read_to_string(path).map_err(|source| PolicyError::Read { path: path.to_owned(), source })?;
        Self::parse(&text)
    }

    /// Parses and validates a policy's TOML text.
    pub fn parse(text: &str) -> Result<Self, PolicyError> {
        let file: PolicyFile = toml::from_str(text)?;
        if file.refusal.trim().is_empty() {
            return Err(PolicyError::EmptyRefusal);
        }
        if file.categories.is_empty() {
            return Err(PolicyError::NoCategories);
        }
        let mut categories = Vec::new();
        let mut keywords = KeywordMatcher::default();
        let (mut patterns, mut regex_rules) = (Vec::new(), Vec::new());
        for (index, (name, c)) in file.categories.into_iter().enumerate() {
            if let Some(value) = c.classifier_threshold.filter(|v| !(0.0..=1.0).contains(v)) {
                return Err(PolicyError::Threshold { category: name, value });
            }
            if c.keywords.is_empty() && c.regexes.is_empty() && c.classifier_threshold.is_none() {
                return Err(PolicyError::NoRules(name));
            }
            if c.stages.is_empty() {
                return Err(PolicyError::NoStages(name));
            }
            for keyword in &c.keywords {
                let phrase = Phrase::parse(index, keyword)
                    .ok_or_else(|| PolicyError::EmptyKeyword { category: name.clone(), keyword: keyword.clone() })?;
                keywords.add(phrase);
            }
            for pattern in &c.regexes {
                // Compiled alone first, for an error that names the pattern.
                RegexBuilder::new(pattern).case_insensitive(true).build().map_err(|e| PolicyError::BadRegex {
                    category: name.clone(),
                    pattern: pattern.clone(),
                    reason: one_line(&e),
                })?;
                patterns.push(pattern.clone());
                regex_rules.push((index, pattern.clone()));
            }
            let _ = c.description;
            categories.push(Category {
                input: c.stages.contains(&Stage::Input),
                output: c.stages.contains(&Stage::Output),
                name,
                action: c.action,
                threshold: c.classifier_threshold,
            });
        }
        let regexes =
            RegexSetBuilder::new(&patterns).case_insensitive(true).build().map_err(|e| PolicyError::BadRegex {
                category: "*".into(),
                pattern: "(all regexes together)".into(),
                reason: one_line(&e),
            })?;
        Ok(Self { version: content_hash(text), refusal: file.refusal, categories, keywords, regexes, regex_rules })
    }

    /// Content hash of the policy's text.
    pub fn version(&self) -> &str {
        &self.version
    }

    /// What a blocked completion is replaced with.
    pub fn refusal(&self) -> &str {
        &self.refusal
    }

    pub fn category_names(&self) -> impl Iterator<Item = &str> {
        self.categories.iter().map(|c| c.name.as_str())
    }

    /// Whether any category checked at `stage` uses the classifier's score.
    pub fn uses_classifier(&self, stage: Stage) -> bool {
        self.categories.iter().any(|c| c.applies(stage) && c.threshold.is_some())
    }

    /// Applies the rules of the categories checked at `stage` to a normalized text, with the
    /// classifier's score when it ran.
    pub fn evaluate(&self, text: &Normalized, stage: Stage, score: Option<f32>) -> Decision {
        let mut hits: Vec<Option<(String, f32)>> = vec![None; self.categories.len()];
        let wanted = |c: usize, hits: &[Option<(String, f32)>]| hits[c].is_none() && self.categories[c].applies(stage);
        for words in text.word_sequences() {
            self.keywords.find(words, |phrase| {
                if wanted(phrase.category, &hits) {
                    hits[phrase.category] = Some((format!("keyword:{}", phrase.keyword), 1.0));
                }
            });
        }
        if !self.regex_rules.is_empty() {
            for haystack in std::iter::once(text.folded.as_str()).chain(text.joined_texts()) {
                for i in self.regexes.matches(haystack).iter() {
                    let (category, pattern) = &self.regex_rules[i];
                    if wanted(*category, &hits) {
                        hits[*category] = Some((format!("regex:{pattern}"), 1.0));
                    }
                }
            }
        }
        if let Some(score) = score {
            for (c, category) in self.categories.iter().enumerate() {
                if let Some(threshold) = category.threshold.filter(|&t| score >= t && wanted(c, &hits)) {
                    hits[c] = Some((format!("classifier>={threshold}"), score));
                }
            }
        }
        let verdicts: Vec<Verdict> = hits
            .into_iter()
            .enumerate()
            .filter_map(|(c, hit)| hit.map(|(rule, score)| (&self.categories[c], rule, score)))
            .map(|(category, rule, score)| Verdict {
                stage: stage.as_str().to_owned(),
                category: category.name.clone(),
                action: category.action.as_str().to_owned(),
                score,
                rule,
            })
            .collect();
        let action = self
            .categories
            .iter()
            .filter(|c| verdicts.iter().any(|v| v.category == c.name))
            .map(|c| c.action)
            .max()
            .unwrap_or(Action::Allow);
        let verdicts = if verdicts.is_empty() {
            vec![Verdict {
                stage: stage.as_str().to_owned(),
                action: Action::Allow.as_str().to_owned(),
                score: score.unwrap_or(0.0),
                ..Default::default()
            }]
        } else {
            verdicts
        };
        Decision { action, verdicts, policy_version: self.version.clone() }
    }
}

/// A regex error in one line: its syntax errors draw the pattern with a caret over several
/// lines; the last one says what is wrong.
fn one_line(e: &regex::Error) -> String {
    let text = e.to_string();
    let last = text.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or_default();
    last.trim().trim_start_matches("error: ").to_owned()
}

/// FNV-1a, 64 bits, as 16 hex digits: stable across builds and platforms.
pub fn content_hash(text: &str) -> String {
    let hash = text.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3));
    format!("{hash:016x}")
}

/// One word of a keyword.
#[derive(Debug)]
struct KeywordWord {
    text: String,
    squeezed: String,
    /// Written with a trailing `*`: matches any word starting with `text`.
    prefix: bool,
}

impl KeywordWord {
    fn matches(&self, word: &Word) -> bool {
        let squeezed_ok = word.is_elongated() && self.squeezed.chars().count() >= MIN_SQUEEZED;
        if self.prefix {
            word.forms.iter().any(|f| f.starts_with(&self.text))
                || (squeezed_ok && word.squeezed.iter().any(|s| s.starts_with(&self.squeezed)))
        } else {
            word.forms.contains(&self.text) || (squeezed_ok && word.squeezed.contains(&self.squeezed))
        }
    }
}

/// A keyword: one or more words in a row.
#[derive(Debug)]
struct Phrase {
    category: usize,
    /// As written in the policy (for the verdict's `rule`).
    keyword: String,
    words: Vec<KeywordWord>,
}

impl Phrase {
    fn parse(category: usize, keyword: &str) -> Option<Self> {
        let mut words = Vec::new();
        for token in keyword.split_whitespace() {
            let prefix = token.ends_with('*');
            let parts = keyword_words(token.trim_end_matches('*'));
            let last = parts.len().saturating_sub(1);
            for (i, text) in parts.into_iter().enumerate() {
                words.push(KeywordWord { squeezed: squeeze(&text), text, prefix: prefix && i == last });
            }
        }
        (!words.is_empty()).then(|| Self { category, keyword: keyword.trim().to_owned(), words })
    }

    fn matches_at(&self, words: &[Word], at: usize) -> bool {
        words.len() >= at + self.words.len() && self.words.iter().zip(&words[at..]).all(|(k, w)| k.matches(w))
    }
}

/// Every keyword of a policy, indexed by its first word.
#[derive(Debug, Default)]
struct KeywordMatcher {
    phrases: Vec<Phrase>,
    by_first: HashMap<String, Vec<usize>>,
    by_first_squeezed: HashMap<String, Vec<usize>>,
    prefix_first: Vec<usize>,
}

impl KeywordMatcher {
    fn add(&mut self, phrase: Phrase) {
        let index = self.phrases.len();
        let first = &phrase.words[0];
        if first.prefix {
            self.prefix_first.push(index);
        } else {
            self.by_first.entry(first.text.clone()).or_default().push(index);
            if first.squeezed.chars().count() >= MIN_SQUEEZED {
                self.by_first_squeezed.entry(first.squeezed.clone()).or_default().push(index);
            }
        }
        self.phrases.push(phrase);
    }

    /// Calls `hit` for every keyword occurrence, in text order.
    fn find(&self, words: &[Word], mut hit: impl FnMut(&Phrase)) {
        let mut candidates: Vec<usize> = Vec::new();
        for (at, word) in words.iter().enumerate() {
            candidates.clear();
            for form in &word.forms {
                candidates.extend(self.by_first.get(form).into_iter().flatten());
            }
            for form in &word.squeezed {
                candidates.extend(self.by_first_squeezed.get(form).into_iter().flatten());
            }
            candidates.extend(&self.prefix_first);
            candidates.sort_unstable();
            candidates.dedup();
            for &p in &candidates {
                let phrase = &self.phrases[p];
                if phrase.matches_at(words, at) {
                    hit(phrase);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::normalize::normalize;

    const SMALL: &str = r#"
refusal = "No."

[categories.insult]
action = "block"
keywords = ["idiot*", "fuck you", "ass", "asshole"]

[categories.mild]
action = "flag"
keywords = ["shit", "damn"]
regexes = ['f\*+ck']
classifier_threshold = 0.8

[categories.pii]
action = "flag"
stages = ["output"]
regexes = ['[a-z0-9._%+-]+@[a-z0-9.-]+\.[a-z]{2,}']

[categories.noted]
action = "allow"
keywords = ["weather"]
"#;

    fn check(policy: &Policy, text: &str, stage: Stage, score: Option<f32>) -> Decision {
        policy.evaluate(&normalize(text), stage, score)
    }

    fn categories(d: &Decision) -> Vec<&str> {
        d.verdicts.iter().map(|v| v.category.as_str()).collect()
    }

    #[test]
    fn a_policy_parses_with_a_content_hash_version() {
        let p = Policy::parse(SMALL).unwrap();
        assert_eq!(p.refusal(), "No.");
        assert_eq!(p.category_names().collect::<Vec<_>>(), ["insult", "mild", "noted", "pii"]);
        assert_eq!(p.version(), content_hash(SMALL));
        assert_eq!(p.version().len(), 16);
        assert_ne!(Policy::parse(&SMALL.replace("No.", "Nope.")).unwrap().version(), p.version());
        assert!(p.uses_classifier(Stage::Input));
        let d = Policy::default_policy();
        assert!(d.category_names().count() >= 5, "{d:?}");
    }

    #[test]
    fn bad_policies_are_refused_with_a_reason() {
        let refused = |text: &str| Policy::parse(text).unwrap_err().to_string();
        let msg = refused(&SMALL.replace(
            r#"action = "flag"
keywords = ["shit""#,
            r#"action = "deny"
keywords = ["shit""#,
        ));
        assert!(msg.contains("unknown variant `deny`"), "{msg}");
        let msg = refused(&SMALL.replace(r"f\*+ck", r"f(uck"));
        assert!(msg.contains("bad regex") && msg.contains("mild") && msg.contains("unclosed group"), "{msg}");
        assert!(!msg.contains('\n'), "one line: {msg}");
        let msg = refused(&SMALL.replace("0.8", "1.5"));
        assert!(msg.contains("outside [0, 1]"), "{msg}");
        assert!(refused(&SMALL.replace("0.8", "-0.1")).contains("outside"));
        assert!(refused(&SMALL.replace(r#""No.""#, r#""  ""#)).contains("refusal"));
        assert!(refused(&SMALL.replace("keywords = [\"weather\"]", "")).contains("no rules"));
        assert!(refused(&SMALL.replace("\"weather\"", "\"...\"")).contains("no letters"));
        assert!(
            refused(&SMALL.replace("stages = [\"output\"]", "stages = [\"sideways\"]")).contains("unknown variant")
        );
        assert!(
            refused(&SMALL.replace("action = \"allow\"", "action = \"allow\"\nactoin = 1")).contains("unknown field")
        );
        assert!(refused("refusal = \"x\"").contains("no categories"));
        assert!(refused("this is = not toml [").contains("not a valid policy"));
    }

    #[test]
    fn keywords_match_whole_words_only() {
        let p = Policy::parse(SMALL).unwrap();
        for benign in
            ["Scunthorpe United", "a first class ticket", "the assassin bug", "shiitake", "grass", "damnation"]
        {
            assert_eq!(check(&p, benign, Stage::Input, None).action, Action::Allow, "{benign}");
        }
        assert_eq!(check(&p, "You idiot.", Stage::Input, None).action, Action::Block);
        assert_eq!(check(&p, "what an ASS", Stage::Input, None).action, Action::Block);
        // A prefix keyword (`idiot*`) matches the words it starts.
        assert_eq!(check(&p, "how idiotic", Stage::Input, None).verdicts[0].rule, "keyword:idiot*");
    }

    #[test]
    fn obfuscated_keywords_and_phrases_match() {
        let p = Policy::parse(SMALL).unwrap();
        for text in ["f u c k you", "F.U.C.K y0u", "fuuuuck you", "1d10t", "@sshole", "asssssshole"] {
            let d = check(&p, text, Stage::Input, None);
            assert_eq!(d.action, Action::Block, "{text}: {d:?}");
        }
        let d = check(&p, "sh1t happens", Stage::Input, None);
        assert_eq!((d.action, d.verdicts[0].rule.as_str()), (Action::Flag, "keyword:shit"));
        assert_eq!(check(&p, "what the f**ck", Stage::Input, None).verdicts[0].rule, r"regex:f\*+ck");
        // `fuck` alone is not `fuck you`.
        assert_eq!(check(&p, "fuck", Stage::Input, None).action, Action::Allow);
    }

    #[test]
    fn stages_thresholds_and_the_allow_verdict() {
        let p = Policy::parse(SMALL).unwrap();
        let email = "write to bob@example.com";
        assert_eq!(check(&p, email, Stage::Input, None).action, Action::Allow);
        let d = check(&p, email, Stage::Output, None);
        assert_eq!((d.action, categories(&d)), (Action::Flag, vec!["pii"]));
        assert_eq!(d.verdicts[0].stage, "output");

        let d = check(&p, "hello", Stage::Input, Some(0.85));
        assert_eq!((d.action, categories(&d)), (Action::Flag, vec!["mild"]));
        assert_eq!((d.verdicts[0].rule.as_str(), d.verdicts[0].score), ("classifier>=0.8", 0.85));
        let d = check(&p, "hello", Stage::Input, Some(0.5));
        assert_eq!(d.action, Action::Allow);
        assert_eq!(d.verdicts.len(), 1);
        assert_eq!(
            (d.verdicts[0].action.as_str(), d.verdicts[0].category.as_str(), d.verdicts[0].score),
            ("allow", "", 0.5)
        );
        assert_eq!(d.policy_version, p.version());

        let d = check(&p, "nice weather, you idiot, shit", Stage::Input, None);
        assert_eq!(d.action, Action::Block);
        assert_eq!(categories(&d), ["insult", "mild", "noted"]);
        assert_eq!(d.blocking().unwrap().category, "insult");
        assert_eq!(check(&p, "nice weather", Stage::Input, None).verdicts[0].action, "allow");
    }
}
