//! Admission control for one route: at most `limit` requests upstream at once, a bounded queue
//! with a wait bound behind it, and (optionally) a limit that adapts to keep latency inside the
//! route's objective, in the spirit of Envoy's adaptive concurrency filter and Netflix's
//! gradient limiter.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tokio::sync::oneshot;

/// How a limiter is set up (from `slo.enforce`).
#[derive(Debug, Clone, PartialEq)]
pub struct LimiterSpec {
    /// The fixed limit, or the adaptive limit's ceiling.
    pub max: u32,
    pub adaptive: bool,
    /// The latency the adaptive limit keeps requests under (the tightest latency objective).
    pub target: Option<Duration>,
    pub queue_size: u32,
}

/// Why a request was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejection {
    /// The queue was full on arrival.
    QueueFull,
    /// The wait bound passed before a slot freed up.
    Timeout,
    /// The slots were freeing up too slowly for this request's turn to come within its wait
    /// bound: refused on arrival rather than after waiting in vain.
    WouldTimeOut,
    /// An adaptive limiter judged the wait not worth it (longer than the short share of its
    /// bound it queues for, or than the gap to the next arrival, or the app has stopped giving
    /// slots back): shed (not a deadline miss).
    LongWait,
}

struct State {
    in_flight: u32,
    /// Current limit; a float so the adaptive controller can move it gradually.
    limit: f64,
    waiters: VecDeque<oneshot::Sender<Permit>>,
    /// Latency samples since the last adaptation.
    samples: u32,
    /// The slowest sample since the last adaptation: the objective is a tail percentile, so
    /// the limit answers to the tail, not the average.
    slowest: Duration,
    window_started: Instant,
    /// How long a slot is held, smoothed (EWMA): with the limit, how fast the queue moves.
    mean_hold: Option<Duration>,
    /// Time between requests asking for a slot, smoothed (adaptive limiters only): how long a
    /// freed slot would stay empty if nobody waited for it.
    mean_gap: Option<Duration>,
    last_arrival: Option<Instant>,
    /// When a slot last changed hands (given back, or granted at once): slots that stopped
    /// coming back are not worth waiting for. A grant counts so that after an idle spell the
    /// first requests over the limit are not mistaken for a paused app.
    last_progress: Option<Instant>,
}

impl State {
    /// How long the `position`-th waiter (from 1) can expect to wait. It gets a slot at the
    /// k-th release from now, k = (in flight − limit) + position: after the adaptive limit
    /// has shrunk, the requests over it must finish before anyone waiting is let in. While
    /// the requests now in flight (N) finish, a slot comes back about every mean hold / N, the
    /// first about half of that from now (they are partway through); a later release waits
    /// for a request admitted meanwhile, which holds its slot for a whole mean hold, and only
    /// `limit` of those run at once. `None` when the very next release lets this request in
    /// (its wait depends on how far along the requests in flight are, which is not tracked),
    /// and until a slot has been given back once.
    fn expected_wait(&self, position: usize) -> Option<Duration> {
        let limit = self.limit.floor().max(1.0);
        let in_flight = f64::from(self.in_flight).max(limit);
        let releases = in_flight - limit + position as f64;
        if releases < 2.0 {
            return None;
        }
        // Releases past the first N come a whole hold after the one `limit` earlier:
        // t(k) = t(k − m·limit) + m·hold, with k − m·limit among the first N.
        let later_rounds = ((releases - in_flight) / limit).ceil().max(0.0);
        let draining = releases - later_rounds * limit;
        self.mean_hold
            .map(|hold| hold.mul_f64((draining - 0.5) / in_flight) + hold.mul_f64(later_rounds))
    }

    fn note_arrival(&mut self, now: Instant) {
        if let Some(previous) = self.last_arrival {
            let gap = now.saturating_duration_since(previous);
            self.mean_gap = Some(match self.mean_gap {
                // One idle spell counts as at most 8x the mean (of at least 100 µs, so a
                // mean that started at a zero gap still grows).
                Some(mean) => {
                    let cap = mean.max(Duration::from_micros(100)) * 8;
                    mean.mul_f64(0.95) + gap.min(cap).mul_f64(0.05)
                }
                None => gap,
            });
        }
        self.last_arrival = Some(now);
    }

    /// Whether an adaptive limiter should queue a request that expects to wait `expected`
    /// (`None`: the very next release). Waiting buys the app one gap between arrivals of
    /// slot time (without the waiter, a freed slot stays empty until the next request comes)
    /// and costs the waiter its wait, plus the whole wait bound when the app stalls. So it
    /// queues only a wait within `share` (a short part of its bound) and no longer than the
    /// mean gap between arrivals: at sustained overload the next arrival refills a freed slot
    /// within that gap anyway, and the queue only added latency, and sheds that took the whole
    /// bound each time the app paused. Nor while no slot has changed hands for longer than
    /// `share` and four times the usual time between releases: the app has stopped answering
    /// and the estimate no longer holds.
    fn worth_queueing(&self, expected: Option<Duration>, share: Duration, now: Instant) -> bool {
        let between_releases = self
            .mean_hold
            .map_or(Duration::ZERO, |hold| hold / self.in_flight.max(1));
        let stalled = self.last_progress.is_some_and(|last| {
            now.saturating_duration_since(last) > share.max(between_releases * 4)
        });
        let bound = self.mean_gap.map_or(share, |gap| gap.min(share));
        !stalled && expected.is_none_or(|wait| wait <= bound)
    }
}

/// One route's admission control; shared by every request of the route across reloads while
/// its spec is unchanged.
pub struct Limiter {
    pub spec: LimiterSpec,
    state: Mutex<State>,
}

impl std::fmt::Debug for Limiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Limiter").field("spec", &self.spec).finish()
    }
}

/// A slot upstream; given back (and its latency learned) when dropped.
pub struct Permit {
    /// `None` once the slot has been given back.
    limiter: Option<Arc<Limiter>>,
    started: Instant,
    /// What this request tells the adaptive limit.
    sample: Option<Sample>,
}

#[derive(Debug, Clone, Copy)]
enum Sample {
    Latency(Duration),
    /// Timed out or hit its deadline: a sign of overload.
    Dropped,
}

impl Permit {
    /// Records how long the upstream took, for the adaptive limit.
    pub fn observe(&mut self, latency: Duration) {
        self.sample = Some(Sample::Latency(latency));
    }

    /// The request timed out upstream: the adaptive limit backs off at once.
    pub fn dropped(&mut self) {
        self.sample = Some(Sample::Dropped);
    }

    /// Time since the slot was granted (≈ the upstream's latency at its response header).
    pub fn held(&self) -> Duration {
        self.started.elapsed()
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        if let Some(limiter) = self.limiter.take() {
            limiter.release(self.sample.take(), self.started.elapsed());
        }
    }
}

/// An adaptive limiter queues a request only when it expects a slot within this share of the
/// request's wait bound. The limit already keeps the app busy (at overload a freed slot is
/// refilled by the next arrival), so the queue only bridges short gaps: a long wait adds to
/// the admitted request's latency, eating into the objective the limit steers by, and each
/// misjudged one ends as a shed that took the whole wait.
const ADAPTIVE_QUEUE_SHARE: u32 = 4;

/// How often the adaptive limit moves, at most.
const ADAPT_EVERY: Duration = Duration::from_millis(100);
const ADAPT_MIN_SAMPLES: u32 = 10;

impl Limiter {
    pub fn new(spec: LimiterSpec) -> Arc<Limiter> {
        let start = if spec.adaptive {
            // Start low and earn the headroom: an overloaded app is protected from the start.
            f64::from(spec.max.clamp(1, 20))
        } else {
            f64::from(spec.max.max(1))
        };
        Arc::new(Limiter {
            spec,
            state: Mutex::new(State {
                in_flight: 0,
                limit: start,
                waiters: VecDeque::new(),
                samples: 0,
                slowest: Duration::ZERO,
                window_started: Instant::now(),
                mean_hold: None,
                mean_gap: None,
                last_arrival: None,
                last_progress: None,
            }),
        })
    }

    /// `(limit, in flight, queued)` now.
    pub fn snapshot(&self) -> (u32, u32, u32) {
        let s = self.state.lock();
        (
            s.limit.floor() as u32,
            s.in_flight,
            s.waiters.iter().filter(|w| !w.is_closed()).count() as u32,
        )
    }

    /// Admits now, or queues for at most `wait`; `Ok((permit, queued))`.
    pub async fn acquire(self: &Arc<Self>, wait: Duration) -> Result<(Permit, bool), Rejection> {
        self.acquire_noting(wait, || ()).await
    }

    /// As [`Self::acquire`]; `on_queue` runs when the request has to wait, and what it returns
    /// is held for the wait (e.g. a count of waiting requests).
    pub async fn acquire_noting<G>(
        self: &Arc<Self>,
        wait: Duration,
        on_queue: impl FnOnce() -> G,
    ) -> Result<(Permit, bool), Rejection> {
        let receiver = {
            let mut s = self.state.lock();
            let now = self.spec.adaptive.then(Instant::now);
            if let Some(now) = now {
                s.note_arrival(now);
            }
            if f64::from(s.in_flight) < s.limit.floor().max(1.0) {
                s.in_flight += 1;
                if now.is_some() {
                    s.last_progress = now;
                }
                return Ok((self.permit(), false));
            }
            s.waiters.retain(|w| !w.is_closed());
            if s.waiters.len() >= self.spec.queue_size as usize || wait.is_zero() {
                return Err(Rejection::QueueFull);
            }
            let expected = s.expected_wait(s.waiters.len() + 1);
            if expected > Some(wait) {
                return Err(Rejection::WouldTimeOut);
            }
            if let Some(now) = now {
                if !s.worth_queueing(expected, wait / ADAPTIVE_QUEUE_SHARE, now) {
                    return Err(Rejection::LongWait);
                }
            }
            let (tx, rx) = oneshot::channel();
            s.waiters.push_back(tx);
            rx
        };
        let _noted = on_queue();
        // A permit sent after we gave up is dropped with the receiver, which gives it back.
        match tokio::time::timeout(wait, receiver).await {
            Ok(Ok(permit)) => Ok((permit, true)),
            _ => Err(Rejection::Timeout),
        }
    }

    fn permit(self: &Arc<Self>) -> Permit {
        Permit {
            limiter: Some(self.clone()),
            started: Instant::now(),
            sample: None,
        }
    }

    fn release(self: &Arc<Self>, sample: Option<Sample>, held: Duration) {
        let mut s = self.state.lock();
        if self.spec.adaptive {
            s.last_progress = Some(Instant::now());
        }
        // One outlier (a long stream, a timeout) moves the mean by at most 60 %.
        s.mean_hold = Some(match s.mean_hold {
            Some(mean) => mean.mul_f64(0.8) + held.min(mean * 4).mul_f64(0.2),
            None => held,
        });
        let busy = s.in_flight;
        s.in_flight = s.in_flight.saturating_sub(1);
        match sample.filter(|_| self.spec.adaptive) {
            Some(Sample::Latency(latency)) => self.adapt(&mut s, latency, busy),
            // Multiplicative decrease on a drop, as AIMD limiters do.
            Some(Sample::Dropped) => s.limit = (s.limit * 0.9).max(1.0),
            None => {}
        }
        // Hand free slots to waiters in arrival order; one whose wait ended is skipped.
        while f64::from(s.in_flight) < s.limit.floor().max(1.0) {
            let Some(waiter) = s.waiters.pop_front() else {
                break;
            };
            s.in_flight += 1;
            if let Err(mut permit) = waiter.send(self.permit()) {
                // Nobody took it: take the slot back here (the lock is held, so the permit
                // must not give it back itself).
                permit.limiter = None;
                s.in_flight -= 1;
            }
        }
    }

    /// Gradient step: shrink the limit in proportion to how far the window's slowest response
    /// is over the target, grow it (by about √limit) while it is inside.
    /// `busy` is how many requests were in flight: the limit only grows while it is used
    /// (at least half of it), so an idle route does not drift to its ceiling.
    fn adapt(&self, s: &mut State, latency: Duration, busy: u32) {
        let Some(target) = self.spec.target else {
            return;
        };
        s.samples += 1;
        s.slowest = s.slowest.max(latency);
        if s.samples < ADAPT_MIN_SAMPLES || s.window_started.elapsed() < ADAPT_EVERY {
            return;
        }
        let slowest = s.slowest.as_secs_f64();
        s.samples = 0;
        s.slowest = Duration::ZERO;
        s.window_started = Instant::now();
        let gradient = (target.as_secs_f64() / slowest.max(1e-6)).clamp(0.5, 1.0);
        let in_use = f64::from(busy) >= s.limit / 2.0;
        let headroom = if gradient >= 1.0 && in_use {
            s.limit.sqrt()
        } else {
            0.0
        };
        let next = s.limit * gradient + headroom;
        // Smooth the move so one noisy window cannot swing the limit.
        s.limit = (0.8 * s.limit + 0.2 * next).clamp(1.0, f64::from(self.spec.max.max(1)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::FutureExt;

    fn fixed(max: u32, queue: u32) -> Arc<Limiter> {
        Limiter::new(LimiterSpec {
            max,
            adaptive: false,
            target: None,
            queue_size: queue,
        })
    }

    /// A limit of one, held, whose slots have been held 100 ms each.
    fn one_held_slot(adaptive: bool) -> (Arc<Limiter>, Permit) {
        let limiter = Limiter::new(LimiterSpec {
            max: 1,
            adaptive,
            target: Some(Duration::from_millis(50)),
            queue_size: 10,
        });
        limiter.state.lock().mean_hold = Some(Duration::from_millis(100));
        let held = limiter.acquire(Duration::ZERO).now_or_never().unwrap();
        (limiter, held.unwrap().0)
    }

    /// An adaptive limiter shed the request at once; a fixed one queued it (still waiting).
    fn shed_only_if_adaptive(adaptive: bool, outcome: Option<Result<(Permit, bool), Rejection>>) {
        if adaptive {
            assert_eq!(outcome.map(|r| r.err()), Some(Some(Rejection::LongWait)));
        } else {
            assert!(outcome.is_none(), "a fixed limit queues it (still waiting)");
        }
    }

    /// A request that waits up to `wait` in its own task, returned once it is in the queue.
    async fn queued_waiter(
        limiter: &Arc<Limiter>,
        wait: Duration,
    ) -> tokio::task::JoinHandle<Result<(Permit, bool), Rejection>> {
        let waiting = limiter.snapshot().2;
        let waiter = {
            let limiter = limiter.clone();
            tokio::spawn(async move { limiter.acquire(wait).await })
        };
        while limiter.snapshot().2 == waiting {
            assert!(!waiter.is_finished(), "the request was not queued");
            tokio::task::yield_now().await;
        }
        waiter
    }

    #[tokio::test]
    async fn admits_up_to_the_limit_then_queues_then_sheds() {
        let limiter = fixed(2, 1);
        let a = limiter.acquire(Duration::ZERO).await.unwrap();
        let _b = limiter.acquire(Duration::ZERO).await.unwrap();
        assert!(!a.1);
        // Over the limit with no wait allowed: refused at once.
        assert_eq!(
            limiter.acquire(Duration::ZERO).await.err(),
            Some(Rejection::QueueFull)
        );
        // One waiter fits in the queue and gets the slot the first request frees.
        let waiting = queued_waiter(&limiter, Duration::from_secs(30)).await;
        // The queue (size 1) is full now.
        assert_eq!(
            limiter.acquire(Duration::from_secs(30)).await.err(),
            Some(Rejection::QueueFull)
        );
        drop(a);
        let (_c, queued) = waiting.await.unwrap().unwrap();
        assert!(queued);
        assert_eq!(limiter.snapshot(), (2, 2, 0));
    }

    #[tokio::test]
    async fn a_waiter_that_gave_up_does_not_leak_its_slot() {
        let limiter = fixed(1, 4);
        let first = limiter.acquire(Duration::ZERO).await.unwrap();
        let timed_out = limiter.acquire(Duration::from_millis(1)).await;
        assert_eq!(timed_out.err(), Some(Rejection::Timeout));
        drop(first);
        assert_eq!(limiter.snapshot(), (1, 0, 0));
        assert!(limiter.acquire(Duration::ZERO).await.is_ok());
    }

    #[tokio::test]
    async fn a_request_whose_turn_cannot_come_in_time_is_refused_on_arrival() {
        let limiter = fixed(1, 10);
        // Slots have been held 100 ms each.
        limiter.state.lock().mean_hold = Some(Duration::from_millis(100));
        let held = limiter.acquire(Duration::ZERO).await.unwrap();
        // The first waiter always queues: the slot may free any moment.
        let first = queued_waiter(&limiter, Duration::from_secs(30)).await;
        // The second would wait ~150 ms; willing to wait 10 ms: refused without waiting.
        let refused = limiter.acquire(Duration::from_millis(10)).now_or_never();
        assert_eq!(
            refused.map(|r| r.err()),
            Some(Some(Rejection::WouldTimeOut))
        );
        assert_eq!(limiter.snapshot(), (1, 1, 1));
        // Willing to wait long enough: queued behind the first.
        let second = queued_waiter(&limiter, Duration::from_secs(30)).await;
        drop(held);
        let (first_permit, queued) = first.await.unwrap().unwrap();
        assert!(queued);
        drop(first_permit);
        assert!(second.await.unwrap().unwrap().1);
    }

    #[tokio::test]
    async fn after_the_limit_shrinks_the_requests_over_it_count_against_the_wait() {
        let limiter = fixed(4, 10);
        limiter.state.lock().mean_hold = Some(Duration::from_millis(100));
        let held: Vec<_> = (0..4)
            .map(|_| {
                limiter
                    .acquire(Duration::ZERO)
                    .now_or_never()
                    .unwrap()
                    .unwrap()
            })
            .collect();
        // At the limit, the first waiter is let in by the very next release: it queues even
        // with a short wait.
        assert_eq!(limiter.state.lock().expected_wait(1), None);
        // The limit drops to 1 with 4 in flight: 4 releases before the first waiter's turn,
        // one every ~25 ms, the first ~12.5 ms from now: ~87.5 ms.
        limiter.state.lock().limit = 1.0;
        assert_eq!(
            limiter.state.lock().expected_wait(1),
            Some(Duration::from_micros(87_500))
        );
        // The second waiter needs a fifth release: after the four in flight, the request
        // the first waiter's slot admitted must finish too, a whole hold later: ~187.5 ms.
        assert_eq!(
            limiter.state.lock().expected_wait(2),
            Some(Duration::from_micros(187_500))
        );
        let refused = limiter.acquire(Duration::from_millis(50)).now_or_never();
        assert_eq!(
            refused.map(|r| r.err()),
            Some(Some(Rejection::WouldTimeOut))
        );
        drop(held);
    }

    #[tokio::test]
    async fn an_adaptive_limit_queues_only_short_waits() {
        for adaptive in [false, true] {
            let (limiter, _held) = one_held_slot(adaptive);
            // Requests arrive seconds apart: a freed slot would stay empty that long.
            limiter.state.lock().mean_gap = Some(Duration::from_secs(5));
            let first = queued_waiter(&limiter, Duration::from_secs(30)).await;
            // The second waiter expects ~150 ms: within a 400 ms bound but over a quarter of
            // it, so a fixed limit queues it and an adaptive one sheds it at once (a shed, not
            // a deadline miss: the wait would have fitted).
            let second = limiter.acquire(Duration::from_millis(400)).now_or_never();
            shed_only_if_adaptive(adaptive, second);
            // Within a quarter of a 1 s bound: both queue it.
            let short = limiter.acquire(Duration::from_secs(1)).now_or_never();
            assert!(
                short.is_none(),
                "queued (still waiting), adaptive: {adaptive}"
            );
            first.abort();
        }
    }

    #[tokio::test]
    async fn an_adaptive_limit_does_not_queue_a_wait_the_next_arrival_would_fill() {
        for adaptive in [false, true] {
            let (limiter, _held) = one_held_slot(adaptive);
            // A request every ~10 ms: whoever is shed now, a slot freed in ~150 ms is taken
            // by a newcomer within ~10 ms of freeing.
            limiter.state.lock().mean_gap = Some(Duration::from_millis(10));
            // The next release lets the first waiter in: worth waiting for.
            let first = queued_waiter(&limiter, Duration::from_secs(30)).await;
            let second = limiter.acquire(Duration::from_secs(1)).now_or_never();
            shed_only_if_adaptive(adaptive, second);
            // Requests seconds apart: the same wait is worth it.
            limiter.state.lock().mean_gap = Some(Duration::from_secs(5));
            let third = limiter.acquire(Duration::from_secs(1)).now_or_never();
            assert!(
                third.is_none(),
                "queued (still waiting), adaptive: {adaptive}"
            );
            first.abort();
        }
    }

    #[tokio::test]
    async fn an_adaptive_limit_does_not_queue_while_no_slot_comes_back() {
        for adaptive in [false, true] {
            let (limiter, _held) = one_held_slot(adaptive);
            limiter.state.lock().mean_gap = Some(Duration::from_secs(5));
            // Slots come back about every 100 ms; none for 2 s: the app has stopped answering.
            limiter.state.lock().last_progress = Some(Instant::now() - Duration::from_secs(2));
            let first = limiter.acquire(Duration::from_secs(1)).now_or_never();
            shed_only_if_adaptive(adaptive, first);
            // The last one came back 10 ms ago: the next is due any moment.
            limiter.state.lock().last_progress = Some(Instant::now() - Duration::from_millis(10));
            let second = limiter.acquire(Duration::from_secs(1)).now_or_never();
            assert!(
                second.is_none(),
                "queued (still waiting), adaptive: {adaptive}"
            );
        }
    }

    #[tokio::test]
    async fn after_an_idle_spell_the_first_request_over_the_limit_still_queues() {
        let limiter = Limiter::new(LimiterSpec {
            max: 1,
            adaptive: true,
            target: Some(Duration::from_millis(50)),
            queue_size: 10,
        });
        {
            let mut s = limiter.state.lock();
            s.mean_hold = Some(Duration::from_millis(100));
            s.mean_gap = Some(Duration::from_secs(5));
            // The route has been quiet for 10 s (more than a quarter of the 30 s wait below).
            s.last_progress = Some(Instant::now() - Duration::from_secs(10));
        }
        // A request takes the free slot: the slots are moving again.
        let _held = limiter.acquire(Duration::ZERO).await.unwrap();
        let next = queued_waiter(&limiter, Duration::from_secs(30)).await;
        next.abort();
    }

    #[test]
    fn an_adaptive_limit_learns_the_gap_between_arrivals() {
        let (limiter, _held) = one_held_slot(true);
        let start = Instant::now();
        let mut s = limiter.state.lock();
        // Forget the arrival of the request that holds the slot.
        s.last_arrival = None;
        s.mean_gap = None;
        s.note_arrival(start);
        s.note_arrival(start + Duration::from_millis(10));
        assert_eq!(s.mean_gap, Some(Duration::from_millis(10)));
        // 0.95 x 10 ms + 0.05 x 20 ms.
        s.note_arrival(start + Duration::from_millis(30));
        assert_eq!(s.mean_gap, Some(Duration::from_micros(10_500)));
        // An idle hour counts as at most 8x the mean: 0.95 x 10.5 + 0.05 x 84 ms.
        s.note_arrival(start + Duration::from_secs(3600));
        assert_eq!(s.mean_gap, Some(Duration::from_micros(14_175)));
    }

    #[test]
    fn slot_hold_times_are_smoothed() {
        let limiter = fixed(1, 1);
        limiter.state.lock().in_flight = 2;
        limiter.release(None, Duration::from_millis(100));
        assert_eq!(
            limiter.state.lock().mean_hold,
            Some(Duration::from_millis(100))
        );
        limiter.release(None, Duration::from_millis(200));
        assert_eq!(
            limiter.state.lock().mean_hold,
            Some(Duration::from_millis(120))
        );
        // An outlier counts as at most 4x the mean: 0.8 x 120 + 0.2 x 480.
        limiter.state.lock().in_flight = 1;
        limiter.release(None, Duration::from_secs(30));
        assert_eq!(
            limiter.state.lock().mean_hold,
            Some(Duration::from_millis(192))
        );
    }

    #[test]
    fn adaptive_limit_shrinks_when_slow_and_grows_when_fast() {
        let limiter = Limiter::new(LimiterSpec {
            max: 100,
            adaptive: true,
            target: Some(Duration::from_millis(50)),
            queue_size: 10,
        });
        let start = limiter.snapshot().0;
        let feed = |latency: Duration, rounds: usize| {
            for _ in 0..rounds {
                let mut s = limiter.state.lock();
                s.window_started = Instant::now() - ADAPT_EVERY;
                for _ in 0..ADAPT_MIN_SAMPLES {
                    let busy = s.limit as u32;
                    limiter.adapt(&mut s, latency, busy);
                }
            }
        };
        feed(Duration::from_millis(10), 30);
        let grown = limiter.snapshot().0;
        assert!(grown > start, "{start} -> {grown}");
        feed(Duration::from_millis(400), 30);
        let shrunk = limiter.snapshot().0;
        assert!(shrunk < grown / 2, "{grown} -> {shrunk}");
        assert!(shrunk >= 1);
        // An idle route does not drift up however fast its rare requests are.
        let before = limiter.snapshot().0;
        for _ in 0..30 {
            let mut s = limiter.state.lock();
            s.window_started = Instant::now() - ADAPT_EVERY;
            for _ in 0..ADAPT_MIN_SAMPLES {
                limiter.adapt(&mut s, Duration::from_millis(1), 0);
            }
        }
        assert_eq!(limiter.snapshot().0, before);
        // A timed-out request takes 10 % off at once.
        limiter.state.lock().limit = 50.0;
        limiter.state.lock().in_flight = 1;
        limiter.release(Some(Sample::Dropped), Duration::ZERO);
        assert_eq!(limiter.snapshot().0, 45);
    }
}
