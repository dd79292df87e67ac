//! Classification: a drop's facts, the cause table, and the evidence behind them.
//!
//! Evidence runs commands inside namespaces (`ip`, `nft`, `iptables-save`) and can take a
//! second on a node with a big ruleset, so it runs on a worker thread: the event loop hands it
//! one job per new kind of drop through a bounded queue and keeps counting drops meanwhile.
//! When the queue is full a drop is classified at once from what the kernel reported alone
//! (its evidence then says so), so the loop never waits.
use std::{
    sync::{
        mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TrySendError},
        Arc,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use tokio::sync::Notify;

use crate::{
    causes::{facts, Attribution, Engine, Facts, Verdict},
    changes::feed::Feed,
    events::{Answer, DropEvent},
    evidence::investigator::Investigator,
};

pub use crate::causes::facts::Traced;

/// Kinds of drop waiting for evidence, at most.
pub const QUEUE: usize = 256;

/// One drop to classify.
pub struct Job {
    pub id: u64,
    pub drop: DropEvent,
    pub answer: Option<Answer>,
    /// The ICMP "fragmentation needed" for this packet's sender was just dropped.
    pub frag_needed_dropped: bool,
    /// The drop's kernel stack, symbolized (read on the loop: stack ids are reused).
    pub stack: Vec<Arc<str>>,
}

/// A classified job.
pub struct Done {
    pub id: u64,
    pub verdict: Verdict,
    /// The change keys the cause depends on, filled from the drop (see rules.toml `changes`).
    pub patterns: Vec<String>,
    /// False when the change watcher had not read up to the drop in time (busy, or starved
    /// of CPU): a change just before it may still be unread.
    pub changes_read: bool,
}

/// The cause table and an investigator, with what the probes can see.
pub struct Classifier {
    engine: Engine,
    investigator: Box<dyn Investigator + Send>,
    traced: Traced,
    /// Configuration changes: a verdict that may name one waits until every change made
    /// before its drop has been read.
    changes: Option<Arc<Feed>>,
}

/// How long a verdict waits for the change watcher to read what preceded its drop (it may be
/// running `nft` to describe a rule just added).
const CHANGE_PATIENCE: Duration = Duration::from_secs(1);

impl Classifier {
    pub fn new(engine: Engine, investigator: Box<dyn Investigator + Send>, traced: Traced) -> Self {
        Classifier {
            engine,
            investigator,
            traced,
            changes: None,
        }
    }

    /// Waits for the changes preceding a drop before answering (see [`Classifier::changes`]).
    pub fn with_changes(mut self, feed: Arc<Feed>) -> Self {
        self.changes = Some(feed);
        self
    }

    /// The investigator, for names (namespace and interface names are cheap and cached).
    pub fn investigator(&mut self) -> &mut dyn Investigator {
        self.investigator.as_mut()
    }

    pub fn classify(&mut self, job: &Job) -> Done {
        let d = &job.drop;
        // A drop that stands for kernel counts without an event of its own was never paired
        // with an answer: whether one was sent is unknown.
        let traced = if d.skb == 0 {
            Traced::NONE
        } else {
            self.traced
        };
        let mut facts = Facts::new(
            d,
            job.answer,
            traced,
            &job.stack,
            self.investigator.as_mut(),
        );
        facts.frag_needed_dropped = job.frag_needed_dropped;
        let mut verdict = self.engine.classify(&facts);
        verdict.attribution = attribution(d, &facts, &verdict);
        let patterns = if verdict.benign {
            Vec::new()
        } else {
            self.engine
                .change_patterns(&verdict.cause)
                .iter()
                .filter_map(|p| fill_devices(p, &facts))
                .collect()
        };
        let changes_read = match (&self.changes, patterns.is_empty()) {
            (Some(feed), false) => feed.wait_for(d.ts_ns, CHANGE_PATIENCE),
            _ => true,
        };
        Done {
            id: job.id,
            verdict,
            patterns,
            changes_read,
        }
    }
}

/// Where classification runs.
pub enum Runner {
    /// In the caller's thread, at once (unit tests).
    #[cfg(test)]
    Inline {
        classifier: Box<Classifier>,
        done: Vec<Done>,
    },
    /// On a worker thread.
    Thread(Worker),
}

/// The worker thread and its queues.
pub struct Worker {
    jobs: Option<SyncSender<Job>>,
    done: Receiver<Done>,
    /// Woken when a job is done.
    ready: Arc<Notify>,
    thread: Option<JoinHandle<()>>,
}

impl Runner {
    #[cfg(test)]
    pub fn inline(classifier: Classifier) -> Self {
        Runner::Inline {
            classifier: Box::new(classifier),
            done: Vec::new(),
        }
    }

    /// Starts the worker; `make` builds its classifier there first (reading the baselines the
    /// evidence compares with may take long, and must not hold up the caller).
    pub fn spawn(make: impl FnOnce() -> Classifier + Send + 'static) -> std::io::Result<Self> {
        let (jobs, job_rx) = mpsc::sync_channel::<Job>(QUEUE);
        let (done_tx, done) = mpsc::channel();
        let ready = Arc::new(Notify::new());
        let wake = ready.clone();
        let thread = std::thread::Builder::new()
            .name("dropscope-evidence".into())
            .spawn(move || {
                let mut classifier = make();
                while let Ok(job) = job_rx.recv() {
                    if done_tx.send(classifier.classify(&job)).is_err() {
                        break;
                    }
                    wake.notify_one();
                }
            })?;
        Ok(Runner::Thread(Worker {
            jobs: Some(jobs),
            done,
            ready,
            thread: Some(thread),
        }))
    }

    /// Queues a job; gives it back when the queue is full (or the worker is gone).
    pub fn submit(&mut self, job: Job) -> Result<(), Job> {
        match self {
            #[cfg(test)]
            Runner::Inline { classifier, done } => {
                done.push(classifier.classify(&job));
                Ok(())
            }
            Runner::Thread(w) => match w.jobs.as_ref().map(|tx| tx.try_send(job)) {
                Some(Ok(())) => Ok(()),
                Some(Err(TrySendError::Full(job) | TrySendError::Disconnected(job))) => Err(job),
                None => unreachable!("jobs is only taken on drop"),
            },
        }
    }

    /// The jobs done so far.
    pub fn take(&mut self) -> Vec<Done> {
        match self {
            #[cfg(test)]
            Runner::Inline { done, .. } => std::mem::take(done),
            Runner::Thread(w) => w.done.try_iter().collect(),
        }
    }

    /// Waits until a job is done, at most until `deadline`.
    pub fn wait(&mut self, deadline: Instant) -> Option<Done> {
        match self {
            #[cfg(test)]
            Runner::Inline { done, .. } => done.pop(),
            Runner::Thread(w) => {
                let left = deadline.saturating_duration_since(Instant::now());
                match w.done.recv_timeout(left.max(Duration::from_millis(1))) {
                    Ok(d) => Some(d),
                    Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => None,
                }
            }
        }
    }

    /// Notified when jobs are done (never, inline).
    pub fn notifier(&self) -> Arc<Notify> {
        match self {
            #[cfg(test)]
            Runner::Inline { .. } => Arc::new(Notify::new()),
            Runner::Thread(w) => w.ready.clone(),
        }
    }
}

impl std::ops::Drop for Worker {
    fn drop(&mut self) {
        // Closing the queue ends the thread once its job at hand is done; a job stuck in a
        // namespace command is not waited for (the thread ends with the process).
        self.jobs.take();
        if let Some(t) = self.thread.take() {
            if t.is_finished() {
                let _ = t.join();
            }
        }
    }
}

/// A change key pattern with the drop's devices filled in: the first alternative (`a|b`)
/// whose placeholders the drop can fill; `None` when none can.
fn fill_devices(pattern: &str, facts: &Facts) -> Option<String> {
    pattern
        .split('|')
        .find_map(|alternative| fill_one(alternative, facts))
}

fn fill_one(pattern: &str, facts: &Facts) -> Option<String> {
    let mut out = pattern.to_string();
    for name in crate::causes::table::CHANGE_PLACEHOLDERS {
        let slot = format!("{{{name}}}");
        if out.contains(&slot) {
            let value = match facts.get(name) {
                Some(facts::Value::Str(v)) if !v.starts_with('<') => v.into_owned(),
                _ => return None,
            };
            out = out.replace(&slot, &value);
        }
    }
    Some(out)
}

/// The attribution of a classified drop: netfilter facts from the probes or the stack, and
/// what the rules fetched while classifying it (nothing more is fetched here).
fn attribution(d: &DropEvent, facts: &Facts, verdict: &Verdict) -> Attribution {
    let fetched = facts.fetched();
    let mut a = Attribution {
        route: fetched.route.as_ref().map(|r| r.text.clone()),
        // The MTU the kernel compared with, when the route was looked up for it.
        path_mtu: fetched
            .route
            .as_ref()
            .and_then(|_| match facts.get("path_mtu") {
                Some(facts::Value::Int(m)) => u32::try_from(m).ok(),
                _ => None,
            }),
        tunnel: fetched.tunnel.map(|t| t.name),
        counters: fetched.counters,
        ..Default::default()
    };
    if &*d.reason == "NETFILTER_DROP" {
        a.hook = facts.nf_hook();
        a.hook_from = a.hook.map(|_| {
            if d.context.netfilter.and_then(|n| n.hook).is_some() {
                "probe"
            } else {
                "stack"
            }
        });
        a.engine = facts.get("nf_engine").map(|v| v.to_string());
        a.rule = fetched
            .rule
            .map(|m| format!("[{}] (+{} packets)", m.rule, m.packets));
        a.nf_family = facts.nf_family();
        a.nf_bridged = matches!(facts.get("nf_bridged"), Some(facts::Value::Bool(true)));
        if let Some(r) = &d.context.ruleset {
            a.nf_table = Some(r.table.clone());
            a.nf_chain = r.chain.clone();
        }
    }
    if verdict.cause == "unclassified" {
        if let Some(facts::Value::Str(frames)) = facts.get("frames") {
            if frames != "no stack" {
                a.stack = Some(frames.into_owned());
            }
        }
    }
    a
}
