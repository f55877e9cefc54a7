//! Continuous (iteration-level) batching of concurrent requests over one [`Runner`].
//!
//! The scheduler owns the runner on a dedicated OS thread. Requests arrive through a
//! [`SchedulerHandle`] into a bounded waiting queue (full: [`SubmitError::Overloaded`]). Every
//! iteration of the thread:
//!
//! 1. drops waiting and running requests whose receiver is gone (the client left), releasing
//!    their KV caches;
//! 2. admits waiting requests in arrival order while fewer than `max_running` run and the
//!    KV-cache budget holds the new sequence's reservation (prompt plus `max_tokens`, at most
//!    the per-sequence capacity);
//! 3. runs one batched forward step (`Step::ForwardBatch`) that carries the next prefill chunks
//!    of new sequences, at most `prefill_chunk` prompt tokens in all (a long prompt takes
//!    several iterations, so running sequences keep decoding in between), and one decode token
//!    for every running sequence that has a sampled token to feed. Its linear layers read the
//!    weights once for all of them, which is where aggregate throughput under concurrency
//!    comes from (decode is memory-bound); attention runs per sequence. A step of a single
//!    sequence is a plain `Step::Forward`.
//!
//! Every forward pass goes through [`Runner::run`], so the followers of a tensor-parallel group
//! execute the same passes in the same order; a finished or cancelled sequence is released with
//! `Step::Release`. Sampling, stop tokens, stop sequences,
//! `max_tokens` and streaming follow [`Engine::generate`](super::Engine::generate) exactly, so
//! a greedy request gives the same tokens through either.
//!
//! A step that fails because the tensor-parallel group is lost is fatal: every request gets an
//! error, later submissions get [`SubmitError::Unavailable`] and the thread ends (dropping the
//! runner). Any other failed step fails only its sequence.
//!
//! Prefill/decode disaggregation uses the same loop. On a prefill replica,
//! [`SchedulerHandle::submit_prefill`] queues sequences that end after their prompt: the first
//! token is sampled, every rank sends its shard of the KV cache to a decode replica
//! (`Step::SendKv`), and the receiver gets [`Event::Prefilled`] (the token, the sampler's random
//! state, the log-probabilities when asked for). On a decode replica,
//! [`SchedulerHandle::submit_resume`] queues sequences that start from such a hand-over: once
//! admitted, every rank installs its shard (`Step::InstallKv`) and the first token is taken as
//! if sampled here, so the text, the stop checks and the sampling stream continue exactly as on
//! one replica.

use std::collections::VecDeque;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Instant;

use anyhow::Context;
use tokio::sync::{Notify, mpsc};

use super::detok::TextStream;
use super::generate::{FinishReason, Usage};
use super::runner::{KvTarget, Runner, SeqId, Step};
use super::sampling::{Logprobs, Sampler, SamplingParams};

/// One generated token's log-probability and the most likely alternatives (with
/// `SamplingParams::logprobs`): log softmax of the logits after `logit_bias` and the penalties,
/// before temperature, top-k and top-p.
#[derive(Clone, Debug, PartialEq)]
pub struct TokenLogprobs {
    pub token: u32,
    /// The token's bytes (a piece of UTF-8 text, or part of a character).
    pub bytes: Vec<u8>,
    pub logprob: f32,
    /// (token, bytes, logprob), most likely first.
    pub top: Vec<(u32, Vec<u8>, f32)>,
}
use crate::server::metrics::ServerMetrics;
use crate::tokenizer::Tokenizer;

/// Limits of the scheduler.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SchedulerConfig {
    /// Sequences generated concurrently (at least 1).
    pub max_running: usize,
    /// Requests that may wait for admission; one more is refused as overload.
    pub max_waiting: usize,
    /// KV-cache bytes of all sequences together.
    pub kv_budget_bytes: usize,
    /// Prompt tokens prefilled per iteration, over all new sequences (at least 1).
    pub prefill_chunk: usize,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            max_running: 8,
            max_waiting: 64,
            kv_budget_bytes: 1 << 30,
            prefill_chunk: 512,
        }
    }
}

/// One generation request (a prompt already tokenised).
#[derive(Clone, Debug)]
pub struct Request {
    pub prompt: Vec<u32>,
    /// At least 1; generation also ends when the sequence reaches its KV capacity.
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    /// Generation ends before the first occurrence of any of these (not included in the text).
    pub stop: Vec<String>,
    /// Keep generating past the tokenizer's stop tokens (benchmarks).
    pub ignore_eos: bool,
}

/// The outcome of a finished request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Completion {
    /// The whole generated text (the `Text` events joined).
    pub text: String,
    pub finish_reason: FinishReason,
    pub usage: Usage,
}

/// What a request's receiver gets: text pieces as they become final, then `Done` or `Error`.
/// With `SamplingParams::logprobs`, each generated token's `Logprobs` comes before the text it
/// completes.
#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    Text(String),
    Logprobs(TokenLogprobs),
    Done(Completion),
    /// This sequence failed (the step it was in failed); the replica goes on.
    Error(String),
    /// The replica failed (its group was lost or the scheduler stopped), or this sequence's KV
    /// hand-over between a prefill and a decode replica failed: another replica, or this one
    /// restarted, can take the request again.
    Failed(String),
    /// Prefill/decode disaggregation, on a prefill replica: the prompt is prefilled, the first
    /// token sampled and the KV cache handed to the decode replica; the sequence ends here.
    Prefilled(Prefilled),
}

/// The prefill half of a disaggregated sequence, done ([`Event::Prefilled`]).
#[derive(Clone, Debug, PartialEq)]
pub struct Prefilled {
    /// The first generated token.
    pub token: u32,
    /// The sampler's random state after drawing it ([`Sampler::rng_state`]).
    pub rng_state: u64,
    /// The first token's log-probabilities, when the request asked for them.
    pub logprobs: Option<Logprobs>,
    /// KV-cache bytes sent, all ranks together.
    pub kv_bytes: usize,
    /// Wall time of the hand-over (every rank's shard sent and acknowledged).
    pub kv_seconds: f64,
}

/// Where a decode replica continues a disaggregated sequence from
/// ([`SchedulerHandle::submit_resume`]): the KV cache the prefill replica sent under
/// `transfer`, and what it reported in [`Prefilled`].
#[derive(Clone, Debug, PartialEq)]
pub struct Resume {
    pub transfer: String,
    pub token: u32,
    pub rng_state: u64,
    pub logprobs: Option<Logprobs>,
}

/// What a queued sequence does.
#[derive(Clone, Debug)]
enum Mode {
    /// Prefill and decode here.
    Whole,
    /// Prefill here, then hand the KV cache to `target` under `transfer`.
    Prefill {
        transfer: String,
        target: Arc<KvTarget>,
    },
    /// Install a KV cache handed over by a prefill replica and decode from its first token.
    Resume(Resume),
}

/// Why a request was not accepted.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SubmitError {
    #[error("the server is overloaded: {waiting} requests are already waiting; retry later")]
    Overloaded { waiting: usize },
    #[error("the server is shutting down and admits no new requests")]
    Draining,
    #[error("the prompt has {prompt_tokens} tokens but a sequence holds at most {capacity} tokens")]
    PromptTooLong {
        prompt_tokens: usize,
        capacity: usize,
    },
    #[error("{0}")]
    Invalid(String),
    #[error("the model is unavailable: {0}")]
    Unavailable(String),
}

/// Starts schedulers.
pub struct Scheduler;

impl Scheduler {
    /// Move `runner` onto a new scheduler thread and return the handle that feeds it.
    pub fn spawn(
        runner: Runner,
        cfg: SchedulerConfig,
        metrics: Arc<ServerMetrics>,
    ) -> anyhow::Result<SchedulerHandle> {
        anyhow::ensure!(cfg.max_running >= 1, "max_running must be at least 1");
        anyhow::ensure!(cfg.prefill_chunk >= 1, "prefill_chunk must be at least 1");
        let model = &runner.engine.model;
        let bytes_per_token = model.kv_bytes_per_token().max(1);
        let capacity = (runner.kv_budget_bytes / bytes_per_token)
            .min(cfg.kv_budget_bytes / bytes_per_token)
            .min(model.config.context_length);
        anyhow::ensure!(
            capacity >= 1,
            "a KV-cache budget of {} bytes (per sequence {}) holds no token ({bytes_per_token} bytes each)",
            cfg.kv_budget_bytes,
            runner.kv_budget_bytes
        );
        let tokenizer = Arc::clone(&runner.engine.tokenizer);
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            wake: Condvar::new(),
            idle: Notify::new(),
            in_flight: AtomicUsize::new(0),
            vocab: model.config.vocab,
            capacity,
            bytes_per_token,
            tokenizer,
            metrics,
            cfg,
        });
        let mut worker = Worker {
            runner,
            shared: Arc::clone(&shared),
            running: Vec::new(),
            reserved_tokens: 0,
        };
        let thread_shared = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("tessera-scheduler".into())
            .spawn(move || {
                // The worker outlives a panic in it: the failure is recorded (so /healthz fails)
                // before any running sequence learns of it, which a request answered 503
                // must never see the other way round.
                let result = std::panic::catch_unwind(AssertUnwindSafe(|| worker.run()));
                if let Err(panic) = result {
                    let what = panic
                        .downcast_ref::<&str>()
                        .map(|s| (*s).to_owned())
                        .or_else(|| panic.downcast_ref::<String>().cloned())
                        .unwrap_or_else(|| "a non-text panic payload".into());
                    let msg = format!("the scheduler thread panicked: {what}");
                    tracing::error!("{msg}; the replica stops serving and /healthz fails");
                    thread_shared.fail(msg.clone());
                    worker.fail_all(&msg);
                    thread_shared.in_flight.store(0, Ordering::SeqCst);
                    thread_shared.idle.notify_waiters();
                }
            })
            .context("starting the scheduler thread")?;
        shared.lock().thread = Some(thread);
        Ok(SchedulerHandle {
            _life: Arc::new(Life(Arc::clone(&shared))),
            shared,
        })
    }
}

/// Submits requests to a scheduler. Cheap to clone; when the last clone is dropped the
/// scheduler finishes the requests it has and its thread ends.
#[derive(Clone)]
pub struct SchedulerHandle {
    shared: Arc<Shared>,
    _life: Arc<Life>,
}

impl std::fmt::Debug for SchedulerHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SchedulerHandle")
            .field("config", &self.shared.cfg)
            .field("in_flight", &self.in_flight())
            .finish()
    }
}

impl SchedulerHandle {
    /// Queue a request. The receiver gets its events; dropping it cancels the request.
    pub fn submit(&self, req: Request) -> Result<mpsc::Receiver<Event>, SubmitError> {
        Ok(self.submit_all(vec![req])?.remove(0))
    }

    /// Queue several sequences (the `n` choices of one request) all or none: when the queue
    /// has no room for all of them, none is queued (a refused request leaves nothing behind to
    /// run or to count).
    pub fn submit_all(
        &self,
        reqs: Vec<Request>,
    ) -> Result<Vec<mpsc::Receiver<Event>>, SubmitError> {
        self.submit_modes(reqs.into_iter().map(|r| (r, Mode::Whole)).collect())
    }

    /// Prefill/decode disaggregation, on a prefill replica: queue sequences (all or none, as
    /// [`SchedulerHandle::submit_all`]) that prefill their prompt, sample the first token,
    /// hand the KV cache to `target` under their transfer name and end with
    /// [`Event::Prefilled`] (or [`Event::Failed`] when the hand-over failed). Give each a
    /// `max_tokens` of 1: that is what its cache reserves.
    pub fn submit_prefill(
        &self,
        reqs: Vec<(Request, String)>,
        target: KvTarget,
    ) -> Result<Vec<mpsc::Receiver<Event>>, SubmitError> {
        let target = Arc::new(target);
        self.submit_modes(
            reqs.into_iter()
                .map(|(r, transfer)| {
                    let target = Arc::clone(&target);
                    (r, Mode::Prefill { transfer, target })
                })
                .collect(),
        )
    }

    /// Prefill/decode disaggregation, on a decode replica: queue sequences (all or none) that
    /// start from a KV cache a prefill replica handed over and its first token, and then run
    /// as [`SchedulerHandle::submit_all`]'s do (the first token is the first text).
    pub fn submit_resume(
        &self,
        reqs: Vec<(Request, Resume)>,
    ) -> Result<Vec<mpsc::Receiver<Event>>, SubmitError> {
        for (_, r) in &reqs {
            if r.token as usize >= self.shared.vocab {
                return Err(SubmitError::Invalid(format!(
                    "the first token {} handed over is outside the vocabulary of {}",
                    r.token, self.shared.vocab
                )));
            }
        }
        self.submit_modes(
            reqs.into_iter()
                .map(|(r, resume)| (r, Mode::Resume(resume)))
                .collect(),
        )
    }

    fn submit_modes(
        &self,
        reqs: Vec<(Request, Mode)>,
    ) -> Result<Vec<mpsc::Receiver<Event>>, SubmitError> {
        let s = &self.shared;
        for (req, _) in &reqs {
            self.validate(req)?;
        }
        let mut st = s.lock();
        if let Some(e) = &st.failed {
            return Err(SubmitError::Unavailable(e.clone()));
        }
        if st.draining || st.stopping {
            return Err(SubmitError::Draining);
        }
        if st.waiting.len() + reqs.len() > s.cfg.max_waiting {
            return Err(SubmitError::Overloaded {
                waiting: st.waiting.len(),
            });
        }
        let mut rxs = Vec::with_capacity(reqs.len());
        for (req, mode) in reqs {
            // One slot per generated token (two with logprobs), the final text piece and the
            // end: never full.
            let per_token = 1 + usize::from(req.sampling.logprobs.is_some());
            let (tx, rx) = mpsc::channel(req.max_tokens.min(s.capacity) * per_token + 4);
            let seq = st.next_seq;
            st.next_seq += 1;
            st.waiting.push_back(Pending {
                seq,
                req,
                mode,
                tx,
                submitted: Instant::now(),
            });
            s.in_flight.fetch_add(1, Ordering::SeqCst);
            rxs.push(rx);
        }
        s.metrics.requests_waiting.set(st.waiting.len() as i64);
        drop(st);
        s.wake.notify_all();
        Ok(rxs)
    }

    /// The checks of one request that need no lock.
    fn validate(&self, req: &Request) -> Result<(), SubmitError> {
        let s = &self.shared;
        if req.prompt.is_empty() {
            return Err(SubmitError::Invalid("the prompt has no tokens".into()));
        }
        if req.max_tokens == 0 {
            return Err(SubmitError::Invalid("max_tokens must be at least 1".into()));
        }
        if let Some(t) = req.prompt.iter().find(|&&t| t as usize >= s.vocab) {
            return Err(SubmitError::Invalid(format!(
                "token id {t} is outside the vocabulary of {}",
                s.vocab
            )));
        }
        req.sampling.validate().map_err(SubmitError::Invalid)?;
        req.sampling
            .check_tokens(s.vocab)
            .map_err(SubmitError::Invalid)?;
        super::detok::check_stops(&req.stop).map_err(SubmitError::Invalid)?;
        if req.prompt.len() > s.capacity {
            return Err(SubmitError::PromptTooLong {
                prompt_tokens: req.prompt.len(),
                capacity: s.capacity,
            });
        }
        Ok(())
    }

    /// Whether a request would be queued now (not failed, not draining, room in the queue),
    /// without queueing it: the cheap check the HTTP layer makes before spending CPU on
    /// tokenising a prompt. [`SchedulerHandle::submit`] checks again.
    pub fn admission_check(&self) -> Result<(), SubmitError> {
        let st = self.shared.lock();
        if let Some(e) = &st.failed {
            return Err(SubmitError::Unavailable(e.clone()));
        }
        if st.draining || st.stopping {
            return Err(SubmitError::Draining);
        }
        if st.waiting.len() >= self.shared.cfg.max_waiting {
            return Err(SubmitError::Overloaded {
                waiting: st.waiting.len(),
            });
        }
        Ok(())
    }

    /// Stop admitting: later submissions get [`SubmitError::Draining`]; queued and running
    /// requests finish.
    pub fn begin_drain(&self) {
        self.shared.lock().draining = true;
        self.shared.wake.notify_all();
    }

    /// Whether [`SchedulerHandle::begin_drain`] was called.
    pub fn is_draining(&self) -> bool {
        self.shared.lock().draining
    }

    /// Requests accepted and not yet finished (waiting or running).
    pub fn in_flight(&self) -> usize {
        self.shared.in_flight.load(Ordering::SeqCst)
    }

    /// Resolves when no request is in flight.
    pub async fn wait_idle(&self) {
        loop {
            let notified = self.shared.idle.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.in_flight() == 0 {
                return;
            }
            notified.await;
        }
    }

    /// Why the scheduler stopped serving (the group was lost), if it did.
    pub fn failure(&self) -> Option<String> {
        self.shared.lock().failed.clone()
    }

    /// The model's tokenizer (for building prompts).
    pub fn tokenizer(&self) -> &Arc<Tokenizer> {
        &self.shared.tokenizer
    }

    /// Most tokens (prompt plus generated) one sequence may hold.
    /// Tokens in the model's vocabulary.
    pub fn vocab_size(&self) -> usize {
        self.shared.vocab
    }

    pub fn max_sequence_tokens(&self) -> usize {
        self.shared.capacity
    }

    pub fn config(&self) -> &SchedulerConfig {
        &self.shared.cfg
    }

    /// Stop once the requests in flight are done, and wait for the scheduler thread to end
    /// (which drops the runner: a group leader's followers then see the group closed).
    pub fn shutdown(&self) {
        let thread = {
            let mut st = self.shared.lock();
            st.stopping = true;
            st.thread.take()
        };
        self.shared.wake.notify_all();
        if let Some(t) = thread {
            let _ = t.join();
        }
    }
}

/// Tells the scheduler thread to end when the last handle is gone.
struct Life(Arc<Shared>);

impl Drop for Life {
    fn drop(&mut self) {
        self.0.lock().stopping = true;
        self.0.wake.notify_all();
    }
}

struct Shared {
    state: Mutex<State>,
    wake: Condvar,
    /// Notified whenever `in_flight` drops to zero.
    idle: Notify,
    in_flight: AtomicUsize,
    vocab: usize,
    /// Tokens one sequence may hold.
    capacity: usize,
    bytes_per_token: usize,
    tokenizer: Arc<Tokenizer>,
    metrics: Arc<ServerMetrics>,
    cfg: SchedulerConfig,
}

#[derive(Default)]
struct State {
    waiting: VecDeque<Pending>,
    draining: bool,
    stopping: bool,
    failed: Option<String>,
    next_seq: SeqId,
    thread: Option<std::thread::JoinHandle<()>>,
}

struct Pending {
    seq: SeqId,
    req: Request,
    mode: Mode,
    tx: mpsc::Sender<Event>,
    submitted: Instant,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn fail(&self, msg: String) {
        let mut st = self.lock();
        st.failed.get_or_insert(msg.clone());
        let waiting: Vec<Pending> = st.waiting.drain(..).collect();
        self.metrics.requests_waiting.set(0);
        drop(st);
        for p in waiting {
            let _ = p.tx.try_send(Event::Failed(msg.clone()));
            self.metrics.finished("error");
            self.done_one();
        }
    }

    fn done_one(&self) {
        if self.in_flight.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.idle.notify_waiters();
        }
    }
}

/// How a running sequence ended.
enum End {
    /// The reason, and the final text when a stop sequence completed.
    Finished(FinishReason, Option<String>),
    Cancelled,
    Failed(String),
    /// Its KV hand-over failed ([`Event::Failed`]: the request can be sent again).
    Lost(String),
    /// Prefilled and handed over to a decode replica.
    HandedOff(Prefilled),
}

struct Seq {
    id: SeqId,
    mode: Mode,
    tx: mpsc::Sender<Event>,
    prompt: Vec<u32>,
    /// Prompt tokens already in the cache.
    prefilled: usize,
    max_tokens: usize,
    ignore_eos: bool,
    sampler: Sampler,
    stream: TextStream,
    generated: usize,
    /// The last sampled token, to feed in the next decode step.
    pending: Option<u32>,
    /// Tokens in the KV cache.
    len: usize,
    reserved_tokens: usize,
    /// Whether every rank has made this sequence's KV cache with its reservation
    /// (`Step::Reserve`).
    cache_made: bool,
    submitted: Instant,
    last_token: Option<Instant>,
    end: Option<End>,
}

impl Seq {
    /// Sample the next token from `logits` (processed in place), with its log-probabilities
    /// when the request asked for them.
    fn draw(&mut self, logits: &mut [f32]) -> (u32, Option<Logprobs>) {
        let next = self.sampler.sample_in_place(logits);
        let logprobs = self
            .sampler
            .params()
            .logprobs
            .map(|k| super::sampling::logprobs(logits, next, k));
        (next, logprobs)
    }

    fn send(&mut self, ev: Event) {
        if self.tx.try_send(ev).is_err() && self.end.is_none() {
            self.end = Some(End::Cancelled);
        }
    }
}

struct Worker {
    runner: Runner,
    shared: Arc<Shared>,
    running: Vec<Seq>,
    reserved_tokens: usize,
}

impl Worker {
    fn run(&mut self) {
        loop {
            if !self.admit() {
                break;
            }
            let result = self.iterate();
            if let Err(e) = result {
                let msg = format!("{e:#}");
                tracing::error!("scheduler stopped: {msg}");
                self.fail_all(&msg);
                break;
            }
            self.update_gauges();
        }
        self.update_gauges();
    }

    /// Drop cancelled waiting requests and admit what fits; blocks while there is nothing to
    /// do. Returns false when the thread should end.
    fn admit(&mut self) -> bool {
        let shared = Arc::clone(&self.shared);
        let mut st = shared.lock();
        loop {
            if st.failed.is_some() {
                return false;
            }
            let before = st.waiting.len();
            st.waiting.retain(|p| !p.tx.is_closed());
            for _ in st.waiting.len()..before {
                shared.metrics.finished("cancelled");
                shared.done_one();
            }
            while self.running.len() < shared.cfg.max_running {
                let Some(front) = st.waiting.front() else {
                    break;
                };
                let need = (front.req.prompt.len() + front.req.max_tokens).min(shared.capacity);
                let budget = shared.cfg.kv_budget_bytes / shared.bytes_per_token;
                if self.reserved_tokens + need > budget && !self.running.is_empty() {
                    break;
                }
                let p = st.waiting.pop_front().expect("front exists");
                self.reserved_tokens += need;
                let mut sampler = Sampler::new(p.req.sampling);
                if let Mode::Resume(r) = &p.mode {
                    // The prefill replica drew the first token: continue its random stream
                    // and count the token for the penalties, as `sample_in_place` did there.
                    sampler = sampler.with_rng_state(r.rng_state);
                    sampler.observe(r.token);
                }
                self.running.push(Seq {
                    id: p.seq,
                    mode: p.mode,
                    tx: p.tx,
                    prompt: p.req.prompt,
                    prefilled: 0,
                    max_tokens: p.req.max_tokens,
                    ignore_eos: p.req.ignore_eos,
                    sampler,
                    stream: TextStream::new(&p.req.stop),
                    generated: 0,
                    pending: None,
                    len: 0,
                    reserved_tokens: need,
                    cache_made: false,
                    submitted: p.submitted,
                    last_token: None,
                    end: None,
                });
            }
            shared.metrics.requests_waiting.set(st.waiting.len() as i64);
            shared
                .metrics
                .requests_running
                .set(self.running.len() as i64);
            if !self.running.is_empty() {
                return true;
            }
            if st.stopping && st.waiting.is_empty() {
                return false;
            }
            st = shared.wake.wait(st).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// One iteration: cancellations, prefill chunks, one decode step per sequence, releases.
    fn iterate(&mut self) -> anyhow::Result<()> {
        for s in &mut self.running {
            if s.tx.is_closed() {
                s.end = Some(End::Cancelled);
            }
        }
        self.reap()?;
        // Newly admitted sequences: every rank makes the KV cache with exactly the admitted
        // reservation (no growth by doubling as tokens arrive).
        for i in 0..self.running.len() {
            let s = &self.running[i];
            if s.cache_made || s.end.is_some() {
                continue;
            }
            let step = Step::Reserve {
                seq: s.id,
                tokens: s.reserved_tokens,
            };
            match self.runner.run(&step) {
                Ok(_) => self.running[i].cache_made = true,
                Err(e) if crate::dist::is_group_error(&e) => return Err(e),
                Err(e) => {
                    self.running[i].end =
                        Some(End::Failed(format!("reserving the KV cache: {e:#}")));
                }
            }
        }
        // Sequences handed over by a prefill replica: every rank installs its shard of the KV
        // cache, and the first token is taken as if sampled here.
        for i in 0..self.running.len() {
            let s = &self.running[i];
            let Mode::Resume(r) = &s.mode else { continue };
            if s.end.is_some() || s.prefilled == s.prompt.len() {
                continue;
            }
            let step = Step::InstallKv {
                seq: s.id,
                transfer: r.transfer.clone(),
                tokens: s.prompt.len(),
            };
            let (token, logprobs) = (r.token, r.logprobs.clone());
            match self.runner.run(&step) {
                Ok(_) => {
                    let s = &mut self.running[i];
                    s.prefilled = s.prompt.len();
                    s.len = s.prompt.len();
                    self.accept(i, token, logprobs);
                }
                Err(e) if crate::dist::is_group_error(&e) => return Err(e),
                Err(e) => {
                    tracing::warn!(
                        seq = self.running[i].id,
                        "installing a KV cache failed: {e:#}"
                    );
                    self.running[i].end = Some(End::Lost(format!(
                        "installing the KV cache handed over by the prefill replica failed: {e:#}"
                    )));
                }
            }
        }
        // One batched step: the prefill chunks (at most `prefill_chunk` prompt tokens in all)
        // and one decode token for every sequence that has a sampled token to feed.
        let mut budget = self.shared.cfg.prefill_chunk;
        let mut batch: Vec<(usize, Vec<u32>)> = Vec::new();
        for (i, s) in self.running.iter().enumerate() {
            if s.end.is_some() {
                continue;
            }
            if s.prefilled < s.prompt.len() {
                if budget == 0 {
                    continue;
                }
                let n = (s.prompt.len() - s.prefilled).min(budget);
                budget -= n;
                batch.push((i, s.prompt[s.prefilled..s.prefilled + n].to_vec()));
            } else if let Some(token) = s.pending {
                batch.push((i, vec![token]));
            }
        }
        let results = self.forward(&batch)?;
        for ((i, tokens), logits) in batch.iter().zip(results) {
            let Some(logits) = logits else { continue };
            let s = &mut self.running[*i];
            if s.prefilled < s.prompt.len() {
                s.prefilled += tokens.len();
                if s.prefilled < s.prompt.len() {
                    continue;
                }
                self.shared
                    .metrics
                    .prompt_tokens
                    .inc_by(s.prompt.len() as u64);
            }
            let mut logits = logits;
            if matches!(self.running[*i].mode, Mode::Prefill { .. }) {
                self.hand_off(*i, &mut logits)?;
            } else {
                self.sample(*i, &mut logits);
            }
        }
        self.reap()
    }

    /// A prefill-only sequence's prompt is in the cache: sample the first token, then every
    /// rank sends its shard of the KV cache to the decode replica (`Step::SendKv`) and the
    /// sequence ends, handed over. A lost group is an error (fatal); a failed hand-over ends
    /// only this sequence.
    fn hand_off(&mut self, i: usize, logits: &mut [f32]) -> anyhow::Result<()> {
        let metrics = Arc::clone(&self.shared.metrics);
        let s = &mut self.running[i];
        let (token, logprobs) = s.draw(logits);
        let now = Instant::now();
        metrics
            .time_to_first_token
            .observe((now - s.submitted).as_secs_f64());
        s.last_token = Some(now);
        let Mode::Prefill { transfer, target } = &s.mode else {
            unreachable!("hand_off is called for prefill-only sequences");
        };
        let step = Step::SendKv {
            seq: s.id,
            transfer: transfer.clone(),
            target: KvTarget::clone(target),
        };
        let (seq, rng_state) = (s.id, s.sampler.rng_state());
        let sent = self.runner.run(&step);
        let kv_seconds = now.elapsed().as_secs_f64();
        let end = match sent {
            Ok(_) => End::HandedOff(Prefilled {
                token,
                rng_state,
                logprobs,
                kv_bytes: self.runner.seq_len(seq)
                    * self.runner.engine.model.kv_bytes_per_token()
                    * self.runner.engine.collective.world(),
                kv_seconds,
            }),
            Err(e) if crate::dist::is_group_error(&e) => return Err(e),
            Err(e) => {
                tracing::warn!(seq, "handing a KV cache over failed: {e:#}");
                End::Lost(format!(
                    "handing the KV cache to the decode replica failed: {e:#}"
                ))
            }
        };
        self.running[i].end = Some(end);
        Ok(())
    }

    /// Run the forward steps of `batch` (running index, tokens): one `Step::ForwardBatch` for
    /// several sequences, a `Step::Forward` for one. Gives each sequence's logits, or `None`
    /// where its step failed (the sequence ends). A lost group is an error (fatal). When a
    /// batched step fails for another reason (no cache changed on any rank), each sequence is
    /// run alone, so that only the sequence at fault fails.
    fn forward(&mut self, batch: &[(usize, Vec<u32>)]) -> anyhow::Result<Vec<Option<Vec<f32>>>> {
        if let [(i, tokens)] = batch {
            return Ok(vec![self.forward_one(*i, tokens.clone())?]);
        }
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        let seqs = batch
            .iter()
            .map(|(i, t)| (self.running[*i].id, t.clone()))
            .collect();
        let vocab = self.shared.vocab;
        let e = match self.runner.run(&Step::ForwardBatch { seqs }) {
            Ok(Some(logits)) if logits.len() == batch.len() * vocab => {
                let mut out = Vec::with_capacity(batch.len());
                for ((i, tokens), l) in batch.iter().zip(logits.chunks_exact(vocab)) {
                    let s = &mut self.running[*i];
                    s.len += tokens.len();
                    s.pending = None;
                    out.push(Some(l.to_vec()));
                }
                return Ok(out);
            }
            Ok(Some(logits)) => anyhow::anyhow!(
                "the batched step gave {} logits for {} sequences of {vocab}",
                logits.len(),
                batch.len()
            ),
            Ok(None) => anyhow::anyhow!("the forward step gave no logits"),
            Err(e) if crate::dist::is_group_error(&e) => return Err(e),
            Err(e) => e,
        };
        tracing::warn!(
            "a batched step of {} sequences failed ({e:#}); running them one by one",
            batch.len()
        );
        batch
            .iter()
            .map(|(i, tokens)| self.forward_one(*i, tokens.clone()))
            .collect()
    }

    /// Run a forward step for sequence `i`. A lost group is an error (fatal); any other
    /// failure ends the sequence and gives `None`.
    fn forward_one(&mut self, i: usize, tokens: Vec<u32>) -> anyhow::Result<Option<Vec<f32>>> {
        let n = tokens.len();
        let seq = self.running[i].id;
        match self.runner.run(&Step::Forward { seq, tokens }) {
            Ok(Some(logits)) => {
                let s = &mut self.running[i];
                s.len += n;
                s.pending = None;
                Ok(Some(logits))
            }
            Ok(None) => {
                self.running[i].end = Some(End::Failed("the forward step gave no logits".into()));
                Ok(None)
            }
            Err(e) if crate::dist::is_group_error(&e) => Err(e),
            Err(e) => {
                tracing::warn!(seq, "a forward step failed: {e:#}");
                self.running[i].end = Some(End::Failed(format!("{e:#}")));
                Ok(None)
            }
        }
    }

    /// Choose the next token of sequence `i` from its logits (as `Engine::generate` does).
    fn sample(&mut self, i: usize, logits: &mut [f32]) {
        let (next, logprobs) = self.running[i].draw(logits);
        self.accept(i, next, logprobs);
    }

    /// Take `next` as sequence `i`'s next token (sampled here, or handed over by a prefill
    /// replica): stop checks, metrics, log-probabilities, text.
    fn accept(&mut self, i: usize, next: u32, logprobs: Option<Logprobs>) {
        let tokenizer = &self.runner.engine.tokenizer;
        let metrics = &self.shared.metrics;
        let capacity = self.shared.capacity;
        let s = &mut self.running[i];
        let stop = (!s.ignore_eos && tokenizer.is_stop(next))
            || s.sampler.params().stop_token_ids.contains(&next);
        // The first token's time counts even when that token ends the sequence (an empty
        // answer still had a first token); later stop tokens are not generated text.
        let now = Instant::now();
        match s.last_token {
            None => metrics
                .time_to_first_token
                .observe((now - s.submitted).as_secs_f64()),
            Some(t) if !stop => metrics.inter_token_latency.observe((now - t).as_secs_f64()),
            Some(_) => {}
        }
        s.last_token = Some(now);
        if stop {
            s.end = Some(End::Finished(FinishReason::Stop, None));
            return;
        }
        s.generated += 1;
        metrics.generated_tokens.inc();
        let piece = tokenizer.decode_bytes(&[next], true);
        if let Some(lp) = logprobs {
            let top = lp
                .top
                .iter()
                .map(|&(t, l)| (t, tokenizer.decode_bytes(&[t], false), l))
                .collect();
            s.send(Event::Logprobs(TokenLogprobs {
                token: next,
                bytes: piece.clone(),
                logprob: lp.logprob,
                top,
            }));
        }
        let mut out = Vec::new();
        let stopped = s.stream.push(&piece, &mut |t: &str| out.push(t.to_owned()));
        for t in out {
            s.send(Event::Text(t));
        }
        if let Some(text) = stopped {
            s.end
                .get_or_insert(End::Finished(FinishReason::Stop, Some(text)));
            return;
        }
        if s.generated >= s.max_tokens || s.len + 1 > capacity {
            s.end
                .get_or_insert(End::Finished(FinishReason::Length, None));
            return;
        }
        s.pending = Some(next);
    }

    /// Release ended sequences and tell their receivers.
    fn reap(&mut self) -> anyhow::Result<()> {
        let mut i = 0;
        while i < self.running.len() {
            if self.running[i].end.is_none() {
                i += 1;
                continue;
            }
            let mut s = self.running.remove(i);
            self.reserved_tokens -= s.reserved_tokens;
            let released = self.runner.run(&Step::Release { seq: s.id });
            // The last event goes out only after the bookkeeping, so that a client that has
            // its answer sees the metrics and `in_flight` without it.
            let (outcome, last) = match s.end.take().expect("ended") {
                End::Finished(reason, stopped_text) => {
                    // A completed stop sequence fixes the text; otherwise flush what the stream
                    // held back.
                    let text = match stopped_text {
                        Some(t) => t,
                        None => {
                            let mut out = Vec::new();
                            let t = s.stream.finish(&mut |p: &str| out.push(p.to_owned()));
                            for p in out {
                                s.send(Event::Text(p));
                            }
                            t
                        }
                    };
                    let done = Event::Done(Completion {
                        text,
                        finish_reason: reason,
                        usage: Usage {
                            prompt_tokens: s.prompt.len(),
                            completion_tokens: s.generated,
                        },
                    });
                    (reason.as_str(), Some(done))
                }
                End::Cancelled => ("cancelled", None),
                End::Failed(msg) => ("error", Some(Event::Error(msg))),
                End::Lost(msg) => ("error", Some(Event::Failed(msg))),
                End::HandedOff(p) => ("handoff", Some(Event::Prefilled(p))),
            };
            self.update_gauges();
            self.shared.metrics.finished(outcome);
            self.shared.done_one();
            if let Some(ev) = last {
                let _ = s.tx.try_send(ev);
            }
            if let Err(e) = released
                && crate::dist::is_group_error(&e)
            {
                return Err(e);
            }
        }
        Ok(())
    }

    fn fail_all(&mut self, msg: &str) {
        for s in self.running.drain(..) {
            let _ = s.tx.try_send(Event::Failed(msg.to_owned()));
            self.shared.metrics.finished("error");
            self.shared.done_one();
        }
        self.reserved_tokens = 0;
        self.shared.fail(msg.to_owned());
    }

    fn update_gauges(&self) {
        let m = &self.shared.metrics;
        m.requests_running.set(self.running.len() as i64);
        let budget = self.shared.cfg.kv_budget_bytes.max(1) as f64;
        m.kv_cache_utilization
            .set((self.runner.kv_bytes_used() as f64 / budget).min(1.0));
    }
}
