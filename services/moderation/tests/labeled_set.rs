//! The shipped default policy plus the real profanity classifier on a labeled set: abusive
//! texts, plainly written and obfuscated, and benign texts, many holding words that a naive
//! substring filter would catch. Prints precision and recall of "flag or block" against the
//! labels, the exact-action agreement and every miss, then asserts floors. The set was written
//! before the rules were tuned; the rules name no test string.
//!
//! Needs `models/prepared/manifest.json` (`scripts/prepare-models.sh`). No NATS.
use std::path::PathBuf;
use std::sync::Arc;

use millrace_moderation::moderator::{ClassifierPool, Moderator, PolicyStore};
use millrace_moderation::policy::{Action, Policy, Stage};

use Action::{Allow, Block, Flag};

/// (text, the action the default policy should take).
const LABELED: &[(&str, Action)] = &[
    // Abuse, threats and profanity, plainly written.
    ("fuck you, you worthless piece of shit", Block),
    ("You are a fucking idiot.", Block),
    ("shut up you stupid bitch", Block),
    ("I will kill you if you come near my house again", Block),
    ("kys nobody wants you here", Block),
    ("go kill yourself loser", Block),
    ("you're such a moron, honestly", Block),
    ("what an asshole that guy is", Block),
    ("I'm going to hurt you and your family", Block),
    ("Fuck off and leave me alone", Block),
    ("you dumbass, read the docs", Block),
    ("you pathetic loser", Block),
    ("what a cunt", Block),
    ("I know where you live and I'm coming for you", Block),
    ("that son of a bitch stole my bike", Block),
    ("eat shit and die", Block),
    ("stfu already", Block),
    ("I'll stab you when you least expect it", Block),
    ("this is complete bullshit", Flag),
    ("holy shit, the build failed again", Flag),
    ("damn, I forgot my keys", Flag),
    ("screw this fucking printer", Flag),
    ("wtf is wrong with this code", Flag),
    ("that movie was crap", Flag),
    ("I want to kill myself, nothing matters anymore", Flag),
    ("I have been feeling suicidal lately", Flag),
    // Harder: no keyword names these; they rest on the classifier or slip through.
    ("you're a waste of oxygen", Block),
    ("nobody would miss you if you disappeared", Block),
    ("what a dipshit", Block),
    ("go to hell", Flag),
    // Obfuscated.
    ("f u c k you", Block),
    ("what an @sshole", Block),
    ("k.y.s", Block),
    ("F.U.C.K. O.F.F", Block),
    ("you are an 1d10t", Block),
    ("fuuuuck youuuu", Block),
    ("b1tch please", Block),
    ("ｆｕｃｋ ｙｏｕ", Block),
    ("go d1e in a fire", Block),
    ("i'll k1ll you", Block),
    ("m0therfucker", Block),
    ("u r a l0ser", Block),
    ("you are a l-o-s-e-r", Block),
    ("sh1t, I missed the bus", Flag),
    ("$h!t happens", Flag),
    ("you f*cking moron", Flag),
    ("s.h.i.t", Flag),
    ("what the f**k is this", Flag),
    ("shiiiiit", Flag),
    // Benign, with words a substring filter would catch.
    ("I grew up in Scunthorpe and loved it", Allow),
    ("The assassin bug is a fascinating insect", Allow),
    ("Can you recommend a cocktail with gin?", Allow),
    ("I'm seeing the therapist on Tuesday", Allow),
    ("I killed it at the gym today", Allow),
    ("Shoot me an email when you're ready", Allow),
    ("I'll shoot you a message later", Allow),
    ("hell yes, let's go hiking", Allow),
    ("Our first class starts at nine", Allow),
    ("The assistant booked a table for two", Allow),
    ("These grapes are delicious", Allow),
    ("That was a hell of a job you did", Allow),
    ("The cockpit of the plane was tiny", Allow),
    ("How do I kill a zombie process in Linux?", Allow),
    ("The bass guitar sounds great in this mix", Allow),
    ("Sussex and Middlesex are English counties", Allow),
    ("This chocolate cake is to die for", Allow),
    ("I could murder a pizza right now", Allow),
    ("We are going to beat you at football next week", Allow),
    ("The shuttlecock flew over the net", Allow),
    ("Is it safe to eat raw shiitake mushrooms?", Allow),
    ("Arsenal won the match on Saturday", Allow),
    ("She is a skilled analyst at the bank", Allow),
    ("Peacocks have beautiful feathers", Allow),
    ("You are not an idiot for asking this question", Allow),
    ("I am so stupid, I forgot my umbrella", Allow),
    ("The suicide prevention hotline is open all night", Allow),
    ("I'm dying to see the new movie", Allow),
    ("Damascus is one of the oldest cities in the world", Allow),
    ("Compute the cumulative sum of an array", Allow),
    ("Sooooo happy to see you!", Allow),
    ("Use the -f flag to force the push", Allow),
    ("Mississippi has four s's and four i's", Allow),
    ("Thank you so much for your help!", Allow),
    ("What is the capital of France?", Allow),
    ("Write a haiku about autumn leaves", Allow),
    ("Can you explain how a hash map works?", Allow),
    ("Call me at 555-0100 after 5pm", Allow),
    ("The recipe needs 3 eggs and 250g of flour", Allow),
    ("Please don't be so hard on yourself, you did great", Allow),
    ("The kids had a blast at the party", Allow),
    ("My grandfather served as a gunner in the war", Allow),
    ("Dickens wrote Great Expectations", Allow),
    ("The hit man in that film was terrifying", Allow),
    ("Kill Bill is my favourite film", Allow),
    ("The new drummer is a real beast on stage", Allow),
];

fn moderator() -> Moderator {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models/prepared");
    let classifier = ClassifierPool::load(&dir, "profanity", 1, 1)
        .unwrap_or_else(|e| panic!("profanity classifier in {}: {e} (run scripts/prepare-models.sh)", dir.display()));
    Moderator::new(Arc::new(PolicyStore::fixed(Policy::default_policy())), Some(Arc::new(classifier)))
}

#[test]
fn the_default_policy_on_a_labeled_set() {
    assert!(LABELED.len() >= 60);
    let moderator = moderator();
    let (mut tp, mut fp, mut fn_, mut tn, mut exact) = (0, 0, 0, 0, 0);
    let mut misses = Vec::new();
    for &(text, expected) in LABELED {
        let decision = moderator.check_blocking(text, Stage::Input).unwrap();
        // MILLRACE_PRINT_SCORES=1: the classifier's score of each text (de-obfuscated, raw).
        if std::env::var_os("MILLRACE_PRINT_SCORES").is_some() {
            let n = millrace_moderation::normalize::normalize(text);
            let s = moderator.classifier.as_ref().unwrap().scores(&[n.joined.as_str(), text]).unwrap();
            println!("{:.3} {:.3} {expected:?} {text}", s[0], s[1]);
        }
        let (predicted, actual) = (decision.action != Allow, expected != Allow);
        match (predicted, actual) {
            (true, true) => tp += 1,
            (true, false) => fp += 1,
            (false, true) => fn_ += 1,
            (false, false) => tn += 1,
        }
        if decision.action == expected {
            exact += 1;
        } else {
            let why: Vec<String> = decision
                .verdicts
                .iter()
                .map(|v| format!("{}/{} {} {:.3}", v.category, v.action, v.rule, v.score))
                .collect();
            misses.push(format!("  expected {expected:?}, got {:?}: {text:?} [{}]", decision.action, why.join("; ")));
        }
    }
    let precision = tp as f64 / (tp + fp).max(1) as f64;
    let recall = tp as f64 / (tp + fn_).max(1) as f64;
    println!("labeled set: {} texts ({} to flag or block, {} benign)", LABELED.len(), tp + fn_, fp + tn);
    println!("flag-or-block: precision {precision:.3} recall {recall:.3} (tp {tp} fp {fp} fn {fn_} tn {tn})");
    println!("exact action (allow/flag/block) agreement: {exact}/{}", LABELED.len());
    if !misses.is_empty() {
        println!("disagreements:\n{}", misses.join("\n"));
    }
    assert!(precision >= 0.9, "precision {precision:.3} < 0.9");
    assert!(recall >= 0.85, "recall {recall:.3} < 0.85");
}

/// The classifier alone, on clean texts: what the thresholds in the default policy rest on.
#[test]
fn the_classifier_separates_plain_profanity_from_plain_text() {
    let moderator = moderator();
    let classifier = moderator.classifier.as_ref().unwrap();
    let scores = classifier.scores(&["you are a fucking idiot", "have a lovely day, friend"]).unwrap();
    println!("classifier scores: {scores:?}");
    assert!(scores[0] > 0.9 && scores[1] < 0.2, "{scores:?}");
}
