//! What each request asks: which user, which prompt (a weighted mix of short, medium and long
//! texts), which model, chosen per request with the phase's seeded rng.
use std::fmt;
use std::str::FromStr;

use rand::Rng;
use rand::rngs::StdRng;

/// Prompt lengths in the built-in mix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PromptClass {
    Short,
    Medium,
    Long,
}

impl PromptClass {
    const ALL: [Self; 3] = [Self::Short, Self::Medium, Self::Long];

    pub fn name(self) -> &'static str {
        match self {
            Self::Short => "short",
            Self::Medium => "medium",
            Self::Long => "long",
        }
    }

    fn texts(self) -> &'static [&'static str] {
        match self {
            Self::Short => &["What is the capital of France?", "Name three primary colours.", "Say hello in Spanish."],
            Self::Medium => &[
                "I am planning a weekend trip to the mountains in late autumn. What should I pack to stay warm and dry?",
                "Explain in simple words why the sky looks blue during the day and red at sunset.",
                "My tomato plants have yellow leaves at the bottom. What could be the cause, and what can I do about it?",
            ],
            Self::Long => &[
                "I run a small bakery and want to reduce the bread we throw away at the end of each day. We bake \
                 about two hundred loaves every morning, sell most of them before noon, and the rest slowly in the \
                 afternoon. Customers like the choice in the morning but we often have thirty loaves left at closing. \
                 Suggest a few practical changes to our baking schedule, pricing and offers that would cut the waste \
                 without disappointing our regular customers.",
                "Write a short story for children about a lighthouse keeper who finds a lost seal pup on the rocks \
                 after a storm. The keeper has to decide whether to keep the pup warm in the lighthouse or return \
                 it to the sea, and the village children help by searching the coast for its mother. Keep the \
                 language simple, give the seal a name, and end the story on a hopeful note.",
            ],
        }
    }
}

/// Relative weights of the prompt classes, written `short=6,medium=3,long=1` (omitted classes
/// get weight 0).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct PromptMix {
    /// Weight per class, in [`PromptClass::ALL`] order.
    weights: [u32; 3],
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum PromptMixError {
    #[error("expected CLASS=WEIGHT, got {0:?}")]
    Malformed(String),
    #[error("unknown prompt class {0:?} (short, medium, long)")]
    UnknownClass(String),
    #[error("weight of {0} is not a whole number")]
    BadWeight(String),
    #[error("all weights are zero")]
    AllZero,
}

impl FromStr for PromptMix {
    type Err = PromptMixError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut weights = [0; 3];
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (name, weight) = part.split_once('=').ok_or_else(|| PromptMixError::Malformed(part.to_owned()))?;
            let index = PromptClass::ALL
                .iter()
                .position(|c| c.name() == name.trim())
                .ok_or_else(|| PromptMixError::UnknownClass(name.trim().to_owned()))?;
            weights[index] = weight.trim().parse().map_err(|_| PromptMixError::BadWeight(name.trim().to_owned()))?;
        }
        if weights.iter().all(|w| *w == 0) {
            return Err(PromptMixError::AllZero);
        }
        Ok(Self { weights })
    }
}

impl fmt::Display for PromptMix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> =
            PromptClass::ALL.iter().zip(self.weights).map(|(c, w)| format!("{}={w}", c.name())).collect();
        f.write_str(&parts.join(","))
    }
}

impl PromptMix {
    fn pick(&self, rng: &mut StdRng) -> PromptClass {
        let total: u32 = self.weights.iter().sum();
        let mut ticket = rng.random_range(0..total);
        for (class, weight) in PromptClass::ALL.into_iter().zip(self.weights) {
            if ticket < weight {
                return class;
            }
            ticket -= weight;
        }
        unreachable!("the ticket is below the total weight")
    }
}

/// One request as every API sends it.
#[derive(Debug, Clone, PartialEq)]
pub struct Query {
    /// Run-wide sequence number; also the WebSocket `ref`.
    pub seq: u64,
    pub user: String,
    /// The conversation this request continues: a user's next `turns` requests share one, so
    /// the session service puts the earlier exchanges in front of the prompt (with `turns` 1,
    /// a fresh one per request and no history).
    pub session: String,
    pub class: PromptClass,
    pub text: &'static str,
    pub model: String,
    pub max_new_tokens: u32,
    /// Generate exactly `max_new_tokens`, past the end of sequence (like-for-like benchmarks).
    pub ignore_eos: bool,
    pub deadline_ms: Option<u32>,
}

/// What every request of a run asks of the model.
#[derive(Debug, Clone, PartialEq)]
pub struct Asks {
    pub model: String,
    pub max_new_tokens: u32,
    pub ignore_eos: bool,
    pub deadline_ms: Option<u32>,
}

/// The run's users, prompt mix and generation settings; hands out [`Query`]s.
pub struct Workload {
    run_id: String,
    users: Vec<String>,
    /// Requests sent so far per user (which conversation and turn the next one is).
    sent: Vec<u64>,
    turns: u64,
    mix: PromptMix,
    asks: Asks,
    next_seq: u64,
}

impl Workload {
    pub fn new(run_id: &str, users: usize, turns: u32, mix: PromptMix, asks: Asks) -> Self {
        let users: Vec<String> = (0..users.max(1)).map(|k| format!("lt-{run_id}-{k}")).collect();
        let sent = vec![0; users.len()];
        Self { run_id: run_id.to_owned(), users, sent, turns: u64::from(turns.max(1)), mix, asks, next_seq: 0 }
    }

    /// The user names this run sends as; every row of theirs in the sink belongs to this run.
    pub fn users(&self) -> &[String] {
        &self.users
    }

    pub fn next_query(&mut self, rng: &mut StdRng) -> Query {
        let seq = self.next_seq;
        self.next_seq += 1;
        let class = self.mix.pick(rng);
        let texts = class.texts();
        let k = rng.random_range(0..self.users.len());
        let conversation = self.sent[k] / self.turns;
        self.sent[k] += 1;
        Query {
            seq,
            user: self.users[k].clone(),
            session: format!("lt-{}-{k}-c{conversation}", self.run_id),
            class,
            text: texts[rng.random_range(0..texts.len())],
            model: self.asks.model.clone(),
            max_new_tokens: self.asks.max_new_tokens,
            ignore_eos: self.asks.ignore_eos,
            deadline_ms: self.asks.deadline_ms,
        }
    }
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;

    use super::*;

    #[test]
    fn a_mix_parses_prints_and_rejects_nonsense() {
        let mix: PromptMix = "short=6, medium=3,long=1".parse().unwrap();
        assert_eq!(mix.weights, [6, 3, 1]);
        assert_eq!(mix.to_string(), "short=6,medium=3,long=1");
        assert_eq!("long=2".parse::<PromptMix>().unwrap().weights, [0, 0, 2]);
        assert_eq!("huge=1".parse::<PromptMix>(), Err(PromptMixError::UnknownClass("huge".into())));
        assert_eq!("short".parse::<PromptMix>(), Err(PromptMixError::Malformed("short".into())));
        assert_eq!("short=x".parse::<PromptMix>(), Err(PromptMixError::BadWeight("short".into())));
        assert_eq!("short=0".parse::<PromptMix>(), Err(PromptMixError::AllZero));
    }

    fn asks() -> Asks {
        Asks { model: "m".into(), max_new_tokens: 8, ignore_eos: false, deadline_ms: Some(500) }
    }

    #[test]
    fn queries_follow_the_mix_spread_over_users_with_fresh_sessions() {
        let mut workload = Workload::new("r1", 4, 1, "short=3,long=1".parse().unwrap(), asks());
        let mut rng = StdRng::seed_from_u64(3);
        let queries: Vec<Query> = (0..4000).map(|_| workload.next_query(&mut rng)).collect();
        let short = queries.iter().filter(|q| q.class == PromptClass::Short).count() as f64 / 4000.0;
        assert!((short - 0.75).abs() < 0.03, "short share {short}");
        assert!(queries.iter().all(|q| q.class != PromptClass::Medium));
        for user in workload.users() {
            let n = queries.iter().filter(|q| &q.user == user).count();
            assert!((800..1200).contains(&n), "{user}: {n}");
        }
        assert_eq!(workload.users()[3], "lt-r1-3");
        let sessions: std::collections::HashSet<&str> = queries.iter().map(|q| q.session.as_str()).collect();
        assert_eq!(sessions.len(), queries.len(), "one conversation per request");
        assert_eq!((queries[0].max_new_tokens, queries[0].deadline_ms, queries[0].model.as_str()), (8, Some(500), "m"));
    }

    #[test]
    fn a_users_next_turns_continue_one_conversation() {
        let mut workload = Workload::new("r1", 2, 3, "short=1".parse().unwrap(), asks());
        let mut rng = StdRng::seed_from_u64(5);
        let queries: Vec<Query> = (0..60).map(|_| workload.next_query(&mut rng)).collect();
        for user in workload.users() {
            let sessions: Vec<&str> = queries.iter().filter(|q| &q.user == user).map(|q| q.session.as_str()).collect();
            for (i, chunk) in sessions.chunks(3).enumerate() {
                assert!(chunk.iter().all(|s| s.ends_with(&format!("-c{i}"))), "{user}: {sessions:?}");
            }
        }
    }
}
