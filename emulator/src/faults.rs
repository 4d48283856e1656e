//! Answers that do not depend on the request's validity: scripted answers per device
//! token (standing, or for the next requests only), tokens listed at start (APNs: the
//! unregistered and bad tokens; FCM: the unregistered ones), random server errors, and
//! latency. Generic over the protocol's answer, so the APNs, FCM and Web Push emulators
//! share it.
//! All adjustable at run time from any thread; reading them costs a few atomic loads.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, RwLock};
use std::time::Duration;

use rand::rngs::ThreadRng;
use rand::Rng;

use super::answer::Answer;
use super::reason;

/// An answer the faults can hand out: cloned for standing scripts, and made up for the
/// random server errors.
pub(crate) trait FaultAnswer: Clone {
    /// One of the protocol's transient server errors, chosen with `rng`.
    fn random_server_error(rng: &mut ThreadRng) -> Self;
}

impl FaultAnswer for Answer {
    fn random_server_error(rng: &mut ThreadRng) -> Answer {
        match rng.gen_range(0..3) {
            0 => Answer::error(429, reason::TOO_MANY_REQUESTS),
            1 => Answer::error(500, reason::INTERNAL_SERVER_ERROR),
            _ => Answer::error(503, reason::SERVICE_UNAVAILABLE),
        }
    }
}

pub(crate) struct Faults<A = Answer> {
    /// `f64` bits: the fraction of valid requests answered with a random server error.
    error_rate: AtomicU64,
    latency_nanos: AtomicU64,
    scripted: RwLock<HashMap<String, A>>,
    /// Answers for the next requests to a token, one each, before the standing script.
    once: Mutex<HashMap<String, VecDeque<A>>>,
    /// Spares the locks when nothing is scripted (the common, fast case).
    any_scripted: AtomicBool,
    /// Answers fixed at start for these tokens, after the random errors.
    listed: HashMap<String, A>,
    /// APNs device tokens are hex, the same token in either case; FCM registration
    /// tokens are case-sensitive.
    fold_case: bool,
}

impl Faults<Answer> {
    /// APNs: `unregistered` tokens are answered 410 with `now_ms` as their timestamp (the
    /// emulator's start), `bad_tokens` 400 BadDeviceToken.
    pub fn new(
        error_rate: f64,
        latency: Duration,
        unregistered: &[String],
        bad_tokens: &[String],
        now_ms: u64,
    ) -> Faults {
        let mut listed = HashMap::new();
        for token in bad_tokens {
            listed.insert(
                token.to_ascii_lowercase(),
                Answer::error(400, reason::BAD_DEVICE_TOKEN),
            );
        }
        for token in unregistered {
            listed.insert(
                token.to_ascii_lowercase(),
                Answer::custom(410, reason::UNREGISTERED, now_ms),
            );
        }
        Faults::with_listed(error_rate, latency, listed, true)
    }
}

impl<A: FaultAnswer> Faults<A> {
    /// `listed`: answers for these tokens, fixed for the emulator's life. `fold_case`:
    /// tokens differing only in case are the same token.
    pub fn with_listed(
        error_rate: f64,
        latency: Duration,
        listed: HashMap<String, A>,
        fold_case: bool,
    ) -> Self {
        let mut faults = Faults {
            error_rate: AtomicU64::new(0),
            latency_nanos: AtomicU64::new(0),
            scripted: RwLock::new(HashMap::new()),
            once: Mutex::new(HashMap::new()),
            any_scripted: AtomicBool::new(false),
            listed: HashMap::new(),
            fold_case,
        };
        faults.listed = listed
            .into_iter()
            .map(|(token, answer)| (faults.key(&token).into_owned(), answer))
            .collect();
        faults.set_error_rate(error_rate);
        faults.set_latency(latency);
        faults
    }

    /// Clamped to `0.0..=1.0`.
    pub fn set_error_rate(&self, rate: f64) {
        let rate = if rate.is_nan() {
            0.0
        } else {
            rate.clamp(0.0, 1.0)
        };
        self.error_rate.store(rate.to_bits(), Ordering::Relaxed);
    }

    pub fn set_latency(&self, latency: Duration) {
        let nanos = u64::try_from(latency.as_nanos()).unwrap_or(u64::MAX);
        self.latency_nanos.store(nanos, Ordering::Relaxed);
    }

    pub fn latency(&self) -> Duration {
        Duration::from_nanos(self.latency_nanos.load(Ordering::Relaxed))
    }

    /// From now on answer requests for `token` (once they pass validation) with `answer`.
    pub fn script(&self, token: &str, answer: A) {
        let mut scripted = self.scripted.write().unwrap_or_else(|e| e.into_inner());
        scripted.insert(self.key(token).into_owned(), answer);
        self.any_scripted.store(true, Ordering::Release);
    }

    /// Answer the next request for `token` (once it passes validation) with `answer`,
    /// then as before; queued after answers already scripted this way.
    pub fn script_once(&self, token: &str, answer: A) {
        let mut once = self.once.lock().unwrap_or_else(|e| e.into_inner());
        once.entry(self.key(token).into_owned())
            .or_default()
            .push_back(answer);
        self.any_scripted.store(true, Ordering::Release);
    }

    pub fn clear_scripts(&self) {
        let mut scripted = self.scripted.write().unwrap_or_else(|e| e.into_inner());
        let mut once = self.once.lock().unwrap_or_else(|e| e.into_inner());
        scripted.clear();
        once.clear();
        self.any_scripted.store(false, Ordering::Release);
    }

    /// The answer for a valid request to `token`, if something other than success:
    /// an answer scripted once first, then a standing scripted answer, then a random
    /// server error, then the listed tokens.
    pub fn answer_for(&self, token: &str) -> Option<A> {
        self.scripted_for(token)
            .or_else(|| self.random_error())
            .or_else(|| self.listed_for(token))
    }

    /// The answer scripted for `token`, if any: one scripted once first (used up), then a
    /// standing one.
    pub fn scripted_for(&self, token: &str) -> Option<A> {
        if !self.any_scripted.load(Ordering::Acquire) {
            return None;
        }
        let mut once = self.once.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(queue) = once.get_mut(&*self.key(token)) {
            let answer = queue.pop_front();
            if queue.is_empty() {
                once.remove(&*self.key(token));
            }
            if answer.is_some() {
                return answer;
            }
        }
        drop(once);
        let scripted = self.scripted.read().unwrap_or_else(|e| e.into_inner());
        scripted.get(&*self.key(token)).cloned()
    }

    /// A random server error, as often as the error rate says.
    pub fn random_error(&self) -> Option<A> {
        let rate = f64::from_bits(self.error_rate.load(Ordering::Relaxed));
        if rate > 0.0 {
            let mut rng = rand::thread_rng();
            if rng.gen_bool(rate) {
                return Some(A::random_server_error(&mut rng));
            }
        }
        None
    }

    fn listed_for(&self, token: &str) -> Option<A> {
        if self.listed.is_empty() {
            return None;
        }
        self.listed.get(&*self.key(token)).cloned()
    }

    fn key<'t>(&self, token: &'t str) -> std::borrow::Cow<'t, str> {
        if self.fold_case {
            lowercase(token)
        } else {
            token.into()
        }
    }
}

fn lowercase(token: &str) -> std::borrow::Cow<'_, str> {
    if token.bytes().any(|b| b.is_ascii_uppercase()) {
        token.to_ascii_lowercase().into()
    } else {
        token.into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    fn faults() -> Faults {
        Faults::new(
            0.0,
            Duration::ZERO,
            &["AA".repeat(32)],
            &["bb".repeat(32)],
            1234,
        )
    }

    #[test]
    fn token_lists_ignore_case() {
        let f = faults();
        let gone = f.answer_for(&"aa".repeat(32)).unwrap();
        assert_eq!((gone.status, gone.timestamp_ms), (410, Some(1234)));
        assert_eq!(gone.reason.as_deref(), Some("Unregistered"));
        let bad = f.answer_for(&"BB".repeat(32)).unwrap();
        assert_eq!(bad, Answer::error(400, "BadDeviceToken"));
        assert_eq!(f.answer_for(&"cc".repeat(32)), None);
    }

    #[test]
    fn scripts_come_first_and_can_be_cleared() {
        let f = faults();
        f.set_error_rate(1.0);
        f.script(&"aa".repeat(32), Answer::custom(400, "IdleTimeout", 0));
        assert_eq!(
            f.answer_for(&"AA".repeat(32)),
            Some(Answer::custom(400, "IdleTimeout", 0))
        );
        f.clear_scripts();
        f.set_error_rate(0.0);
        assert_eq!(f.answer_for(&"aa".repeat(32)).unwrap().status, 410);
    }

    #[test]
    fn answers_scripted_once_are_used_once_each_before_the_standing_one() {
        let f = faults();
        let token = "cc".repeat(32);
        f.script(&token, Answer::custom(500, "InternalServerError", 0));
        f.script_once(
            &token.to_uppercase(),
            Answer::custom(403, "ExpiredProviderToken", 0),
        );
        f.script_once(&token, Answer::OK);
        assert_eq!(f.answer_for(&token).unwrap().status, 403);
        assert_eq!(f.answer_for(&token), Some(Answer::OK));
        assert_eq!(f.answer_for(&token).unwrap().status, 500);
        assert_eq!(f.answer_for(&token).unwrap().status, 500);
        f.script_once(&token, Answer::custom(429, "TooManyRequests", 0));
        f.clear_scripts();
        assert_eq!(f.answer_for(&token), None);
    }

    #[test]
    fn error_rate_extremes() {
        let f = faults();
        let token = "cc".repeat(32);
        assert!((0..1000).all(|_| f.answer_for(&token).is_none()));
        f.set_error_rate(1.0);
        let mut seen = HashSet::new();
        for _ in 0..1000 {
            let answer = f.answer_for(&token).unwrap();
            assert_eq!(
                reason::status_of(answer.reason.as_deref().unwrap()),
                Some(answer.status)
            );
            seen.insert(answer.status);
        }
        assert_eq!(seen, HashSet::from([429, 500, 503]));
        f.set_error_rate(f64::NAN);
        assert!(f.answer_for(&token).is_none());
        f.set_error_rate(7.0);
        assert!(f.answer_for(&token).is_some());
    }

    #[test]
    fn latency_round_trips() {
        let f = faults();
        f.set_latency(Duration::from_millis(250));
        assert_eq!(f.latency(), Duration::from_millis(250));
    }
}
