//! Moderating a token stream before a client sees it.
//!
//! Inference streams raw tokens; the mesh's output moderation only sees the whole completion.
//! A client that streams must still never see unmoderated text, so ingest holds the raw text
//! back and releases it in segments, each only after `Moderation.Check` (stage `output`) has
//! allowed all the text up to the segment's end. Segments end at word boundaries (a check never
//! sees half a word) and grow (the first is one word, for a quick first token; later ones are
//! longer, so a long answer costs few checks). What the checks did not release by the end comes
//! from the terminal result, which the mesh's own output moderation produced.
//!
//! Fails closed: a block, or a check that cannot be made, releases nothing more; the client
//! then gets whatever the terminal result allows.
use std::future::Future;
use std::pin::Pin;

use millrace_proto::v1::CheckRequest;
use millrace_proto::v1::moderation_client::ModerationClient;
use tonic::Status;
use tonic::transport::Channel;
use tracing::warn;

/// Length of the second segment, bytes; each later one doubles, up to [`MAX_SEGMENT`].
const SECOND_SEGMENT: usize = 32;
const MAX_SEGMENT: usize = 256;

/// Where the next segment ends: pure bookkeeping of the held-back text.
#[derive(Debug, Default)]
pub struct Segmenter {
    /// Everything received, released or not.
    text: String,
    /// Bytes of `text` released so far.
    released: usize,
    /// Segments released so far.
    segments: u32,
}

impl Segmenter {
    pub fn push(&mut self, piece: &str) {
        self.text.push_str(piece);
    }

    /// The text released so far.
    pub fn released(&self) -> &str {
        &self.text[..self.released]
    }

    /// End (byte offset into all the text) of the next segment, if enough text is held back:
    /// the last word boundary once the segment is long enough.
    pub fn next_cut(&self) -> Option<usize> {
        let held = &self.text[self.released..];
        let min_len = match self.segments {
            0 => 1,
            n => (SECOND_SEGMENT << (n - 1).min(8)).min(MAX_SEGMENT),
        };
        // A boundary is whitespace after a non-space: what precedes it is whole words.
        let cut = held
            .char_indices()
            .zip(held.chars().skip(1))
            .filter(|((_, c), next)| !c.is_whitespace() && next.is_whitespace())
            .map(|((i, c), _)| i + c.len_utf8())
            .last()?;
        (cut >= min_len).then_some(self.released + cut)
    }

    /// The text up to `cut`, which is what a check must allow before the segment goes out.
    pub fn through(&self, cut: usize) -> &str {
        &self.text[..cut]
    }

    /// Marks the text up to `cut` as released and returns the newly released part.
    pub fn release(&mut self, cut: usize) -> &str {
        let from = self.released;
        self.released = cut;
        self.segments += 1;
        &self.text[from..cut]
    }
}

/// The outcome of one check: the segment's end and whether it may go out.
type Check = Pin<Box<dyn Future<Output = (usize, Result<bool, Status>)> + Send>>;

/// A segmenter plus the moderation checks that release its segments. One check runs at a time,
/// in the background of the caller's loop ([`StreamGuard::checked`]), so tokens keep arriving
/// and a terminal result is noticed while a check is under way.
pub struct StreamGuard {
    checker: Option<ModerationClient<Channel>>,
    segmenter: Segmenter,
    pending: Option<Check>,
    /// Set by a block or a failed check: nothing more is released.
    closed: bool,
}

impl StreamGuard {
    /// `checker` None: nothing is released early (the stream comes from the terminal result).
    pub fn new(checker: Option<ModerationClient<Channel>>) -> Self {
        Self { closed: checker.is_none(), checker, segmenter: Segmenter::default(), pending: None }
    }

    pub fn released(&self) -> &str {
        self.segmenter.released()
    }

    /// Takes a raw piece, starting a check if a segment is ready and none runs.
    pub fn push(&mut self, piece: &str) {
        self.segmenter.push(piece);
        self.start_check();
    }

    /// Whether a check is under way ([`StreamGuard::checked`] has something to wait for).
    pub fn checking(&self) -> bool {
        self.pending.is_some()
    }

    /// Waits for the running check; returns the text it released, if any, and starts the
    /// next check when another segment is ready.
    pub async fn checked(&mut self, request_id: &str) -> Option<String> {
        let (cut, outcome) = self.pending.as_mut()?.await;
        self.pending = None;
        match outcome {
            Ok(true) => {
                let released = self.segmenter.release(cut).to_owned();
                self.start_check();
                Some(released)
            }
            Ok(false) => {
                self.closed = true;
                None
            }
            Err(status) => {
                warn!(request_id, error = %status, "stream moderation check failed; holding the rest back");
                self.closed = true;
                None
            }
        }
    }

    /// Stops checking: the rest of the text comes from elsewhere (the terminal result).
    pub fn stop(&mut self) {
        self.pending = None;
        self.closed = true;
    }

    fn start_check(&mut self) {
        if self.closed || self.pending.is_some() {
            return;
        }
        let (Some(cut), Some(checker)) = (self.segmenter.next_cut(), self.checker.as_ref()) else { return };
        let mut checker = checker.clone();
        let request = CheckRequest { text: self.segmenter.through(cut).to_owned(), stage: "output".into() };
        self.pending = Some(Box::pin(async move {
            (cut, checker.check(request).await.map(|response| response.into_inner().action != "block"))
        }));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn release_all(s: &mut Segmenter) -> Vec<String> {
        let mut out = Vec::new();
        while let Some(cut) = s.next_cut() {
            out.push(s.release(cut).to_owned());
        }
        out
    }

    #[test]
    fn segments_end_at_word_boundaries_and_grow() {
        let mut s = Segmenter::default();
        s.push("Hel");
        assert_eq!(s.next_cut(), None, "half a word is never checked");
        s.push("lo there");
        assert_eq!(release_all(&mut s), ["Hello"]);
        s.push(" friend, how are you");
        assert_eq!(s.next_cut(), None, "the second segment needs 32 bytes");
        s.push(" doing on this fine day? ");
        assert_eq!(release_all(&mut s), [" there friend, how are you doing on this fine day?"]);
        assert_eq!(s.released(), "Hello there friend, how are you doing on this fine day?");
        assert_eq!(s.through(5), "Hello");
    }

    #[test]
    fn multibyte_text_is_cut_on_char_boundaries() {
        let mut s = Segmenter::default();
        s.push("héllo wörld ");
        assert_eq!(release_all(&mut s), ["héllo wörld"]);
    }

    #[test]
    fn a_guard_without_checker_releases_nothing() {
        let mut guard = StreamGuard::new(None);
        guard.push("many words here ");
        assert!(!guard.checking());
        assert_eq!(guard.released(), "");
    }
}
