//! Server-sent events out of one or more inference streams. The SSE body owns the
//! streams and their concurrency permits: when the client goes away, axum drops
//! the body and with it the streams, which cancels the generations.

use crate::error::ApiError;
use crate::http::backend::InferStream;
use crate::http::metrics::RequestMetrics;
use crate::infer_types::{InferError, InferStreamResponse};
use axum::response::sse::{Event, KeepAlive, Sse};
use futures::stream::{self, BoxStream, SelectAll, Stream, StreamExt};
use serde::Serialize;
use std::convert::Infallible;
use tokio::sync::OwnedSemaphorePermit;

/// One generation feeding a response; `index` is its choice index.
pub struct Generation {
    pub index: u32,
    pub permit: OwnedSemaphorePermit,
    pub stream: InferStream,
    pub metrics: RequestMetrics,
}

/// Turns the messages of the generations into events of one API's shape.
pub trait Renderer: Send + 'static {
    fn render(&mut self, index: u32, response: InferStreamResponse) -> Vec<Event>;
    /// After every generation ended well.
    fn finish(&mut self) -> Vec<Event>;
}

pub fn json_event(value: &impl Serialize) -> Event {
    match serde_json::to_string(value) {
        Ok(json) => Event::default().data(json),
        Err(e) => Event::default()
            .data(serde_json::json!({"error": e.to_string(), "error_type": "serialization"}).to_string()),
    }
}

/// `None` marks the end of generation `index`'s stream.
type Tagged = (usize, Option<Result<InferStreamResponse, InferError>>);

struct Slot {
    index: u32,
    metrics: RequestMetrics,
    ended: bool,
    _permit: OwnedSemaphorePermit,
}

struct State<R> {
    merged: SelectAll<BoxStream<'static, Tagged>>,
    slots: Vec<Slot>,
    renderer: R,
    done: bool,
}

impl<R: Renderer> State<R> {
    async fn next_events(&mut self) -> Option<Vec<Event>> {
        if self.done {
            return None;
        }
        let Some((position, message)) = self.merged.next().await else {
            self.done = true;
            return Some(self.renderer.finish());
        };
        let slot = &mut self.slots[position];
        let error = match message {
            Some(Ok(response)) => {
                if let InferStreamResponse::End { generated_text, queued, start, .. } = &response {
                    slot.metrics.success(generated_text, *queued, *start);
                    slot.ended = true;
                }
                return Some(self.renderer.render(slot.index, response));
            }
            Some(Err(error)) => error,
            None if slot.ended => return Some(Vec::new()),
            None => InferError::IncompleteGeneration,
        };
        // One failed generation ends the whole response (and drops the others).
        let error = ApiError::from(error);
        slot.metrics.failure(&error);
        self.done = true;
        Some(vec![json_event(&error.tgi_body())])
    }
}

pub fn sse_response(
    generations: Vec<Generation>,
    renderer: impl Renderer,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let mut merged = SelectAll::new();
    let mut slots = Vec::with_capacity(generations.len());
    for (position, generation) in generations.into_iter().enumerate() {
        let tagged = generation
            .stream
            .map(move |message| (position, Some(message)))
            .chain(stream::once(async move { (position, None) }));
        merged.push(tagged.boxed());
        slots.push(Slot {
            index: generation.index,
            metrics: generation.metrics,
            ended: false,
            _permit: generation.permit,
        });
    }
    let state = State { merged, slots, renderer, done: false };
    let events = stream::unfold(state, |mut state| async move {
        let events = state.next_events().await?;
        Some((events, state))
    })
    .flat_map(stream::iter)
    .map(Ok);
    Sse::new(events).keep_alive(KeepAlive::default())
}
