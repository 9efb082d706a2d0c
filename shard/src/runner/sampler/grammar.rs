//! Constrained rows: a request whose parameters carry a grammar chooses only tokens
//! its grammar allows. The allowed-token mask of the next step is computed by a small
//! pool of worker threads as soon as the row's last token is known (when the request
//! arrives: compiling, then the first mask), so it runs next to the forward pass and
//! the round trip to the router; the sampler waits for it only if it is not done yet.

use anyhow::{bail, Context, Result};
use grammar::{Constraint, GrammarCompiler, GrammarSpec, TokenMask};
use proto::v3::{GrammarType, NextTokenChooserParameters};
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::{Mutex, OnceLock};

/// The grammar a request's parameters ask for, if any.
pub fn spec_from_proto(parameters: Option<&NextTokenChooserParameters>) -> Result<Option<GrammarSpec>> {
    let Some(p) = parameters else {
        return Ok(None);
    };
    let grammar_type = GrammarType::try_from(p.grammar_type)
        .with_context(|| format!("unknown grammar_type {}", p.grammar_type))?;
    Ok(match grammar_type {
        GrammarType::None if p.grammar.is_empty() => None,
        GrammarType::None => bail!("a grammar without a grammar_type"),
        GrammarType::Json => Some(GrammarSpec::JsonSchema(
            serde_json::from_str(&p.grammar).context("the JSON grammar is not a JSON schema")?,
        )),
        GrammarType::Regex => Some(GrammarSpec::Regex(p.grammar.clone())),
        GrammarType::Lark => Some(GrammarSpec::Lark(p.grammar.clone())),
    })
}

/// Worker threads computing masks: a few, since a mask takes well under a millisecond
/// to a few milliseconds and the model's own threads need the cores.
fn mask_workers() -> &'static rayon::ThreadPool {
    static POOL: OnceLock<rayon::ThreadPool> = OnceLock::new();
    POOL.get_or_init(|| {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        rayon::ThreadPoolBuilder::new()
            .num_threads((cores / 4).clamp(1, 4))
            .thread_name(|i| format!("grammar-mask-{i}"))
            .build()
            .expect("starting the grammar mask threads")
    })
}

/// A grammar at a position, with the mask of the tokens allowed there.
struct Computed {
    constraint: Constraint,
    mask: TokenMask,
}

enum State {
    /// A worker compiles the grammar or computes the next mask. (In a mutex only to be
    /// shareable with the sampler's threads, which read masks: it is never contended.)
    Computing(Mutex<Receiver<Result<Computed>>>),
    Ready(Computed),
    /// The grammar allows nothing more.
    Finished,
}

/// The grammar state of one constrained request.
pub struct GrammarRow {
    state: State,
}

impl GrammarRow {
    /// Starts compiling `spec` and computing the first mask.
    pub fn start(compiler: &GrammarCompiler, spec: GrammarSpec) -> Self {
        let compiler = compiler.clone();
        Self {
            state: State::Computing(Mutex::new(compute(move || compiler.compile(&spec)))),
        }
    }

    /// Waits for the mask being computed, if it is not there yet.
    pub fn wait(&mut self) -> Result<()> {
        if let State::Computing(receiver) = &mut self.state {
            let computed = receiver
                .get_mut()
                .map_err(|_| anyhow::anyhow!("a grammar mask thread panicked"))?
                .recv()
                .context("a grammar mask thread stopped")?
                .context("the grammar failed")?;
            self.state = State::Ready(computed);
        }
        Ok(())
    }

    /// The tokens allowed now, once [`Self::wait`] returned (None after the end).
    pub fn mask(&self) -> Option<&TokenMask> {
        match &self.state {
            State::Ready(computed) => Some(&computed.mask),
            State::Computing(_) | State::Finished => None,
        }
    }

    /// Advances past the chosen token and starts computing the next mask.
    pub fn accept(&mut self, token: u32) -> Result<()> {
        self.wait()?;
        let State::Ready(Computed { mut constraint, .. }) = std::mem::replace(&mut self.state, State::Finished) else {
            bail!("token {token} after the grammar's end");
        };
        constraint
            .accept(token)
            .with_context(|| format!("the grammar forbids token {token}"))?;
        if !constraint.is_finished() {
            self.state = State::Computing(Mutex::new(compute(move || Ok(constraint))));
        }
        Ok(())
    }

    /// The grammar is complete and allows no further token.
    pub fn is_finished(&self) -> bool {
        matches!(self.state, State::Finished)
    }
}

/// Runs `prepare` then the mask computation on a worker; the result comes back on the
/// receiver (dropping it, as a finished or filtered request does, discards the work).
fn compute(prepare: impl FnOnce() -> Result<Constraint> + Send + 'static) -> Receiver<Result<Computed>> {
    let (sender, receiver) = sync_channel(1);
    mask_workers().spawn(move || {
        let computed = prepare().and_then(|mut constraint| {
            let mask = constraint.allowed_tokens()?;
            Ok(Computed { constraint, mask })
        });
        let _ = sender.send(computed);
    });
    receiver
}
