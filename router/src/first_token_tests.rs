//! Time to first token through the whole router: a real TCP client against the
//! served app (as `main` serves it), over the real scheduler and the fake shard.
//! Whatever the first token takes beyond the shard's Prefill is the router's.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::api::generate::Info;
use crate::client::fake_shard::{FakeShard, FakeShardConfig};
use crate::http::metrics::prometheus_builder;
use crate::http::listener::{serve, ConnectionLimits};
use crate::http::server::{app, AppState, ServerConfig};
use crate::infer::{Infer, SchedulerConfig};
use crate::validation::{Validation, ValidationLimits};

/// Far above the router's own share (well under a millisecond on an idle
/// server), far below the 40 ms a delayed acknowledgement holds a small write
/// back by when TCP_NODELAY is off.
const MAX_ROUTER_OVERHEAD: Duration = Duration::from_millis(20);

fn info() -> Info {
    crate::http::tests::test_info(1024, 2048, 4096, 16384)
}

/// Sends a streamed completion on `socket` (kept alive) and reads its whole
/// answer; returns when it was sent, and when its headers and first event came.
fn streamed_request(socket: &mut TcpStream, prompt: &str) -> (Instant, Duration, Duration) {
    let body =
        serde_json::json!({"prompt": prompt, "max_tokens": 3, "stream": true, "temperature": 0})
            .to_string();
    let request = format!(
        "POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let sent = Instant::now();
    socket.write_all(request.as_bytes()).unwrap();
    let mut received = Vec::new();
    let mut buffer = [0u8; 4096];
    let mut headers = None;
    let mut first = None;
    // Chunked: the last chunk is empty.
    while !received.ends_with(b"\r\n0\r\n\r\n") {
        let n = socket.read(&mut buffer).unwrap();
        assert!(
            n > 0,
            "connection closed: {}",
            String::from_utf8_lossy(&received)
        );
        received.extend_from_slice(&buffer[..n]);
        let text = String::from_utf8_lossy(&received);
        if headers.is_none() && text.contains("\r\n\r\n") {
            headers = Some(sent.elapsed());
        }
        if first.is_none() && text.contains("data:") {
            first = Some(sent.elapsed());
        }
    }
    // Read to the end, so that the server is idle when the next request comes.
    let text = String::from_utf8_lossy(&received);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(text.contains("[DONE]"), "{text}");
    (sent, headers.unwrap(), first.unwrap())
}

/// A client that keeps its connection alive (every pooled client, benchmark/load.py
/// included) acknowledges the response headers late; without TCP_NODELAY the
/// first event then waits for that acknowledgement.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_first_token_is_not_held_back_on_a_kept_alive_connection() {
    let shard = FakeShard::start(FakeShardConfig {
        block_size: 16,
        kv_capacity_tokens: 16384,
        decode_delay: Duration::ZERO,
        prefill_delay: Duration::ZERO,
        support_chunking: false,
    })
    .await;
    let scheduler = SchedulerConfig {
        max_concurrent_requests: 8,
        max_batch_prefill_tokens: 4096,
        max_batch_total_tokens: None,
        max_batch_size: None,
        waiting_served_ratio: 0.3,
        max_waiting_tokens: 20,
        max_input_tokens: 1024,
        max_total_tokens: 2048,
        prefix_caching: true,
    };
    let (infer, _) = Infer::connect(&shard.path(), scheduler, crate::client::Deadlines::default()).await.unwrap();
    let model = format!(
        "{}/../models/SmolLM2-135M-Instruct",
        env!("CARGO_MANIFEST_DIR")
    );
    let tokenizer = model_store::ModelFiles::open(&model)
        .unwrap()
        .tokenizer()
        .unwrap();
    let limits = ValidationLimits {
        max_input_tokens: 1024,
        max_total_tokens: 2048,
        max_stop_sequences: 4,
        max_top_n_tokens: 5,
    };
    let state = AppState {
        backend: Arc::new(infer),
        validation: Arc::new(Validation::new(tokenizer, 2, limits, crate::validation::grammar::GrammarSupport::Disabled).unwrap()),
        chat_template: None,
        info: Arc::new(info()),
        metrics: prometheus_builder(2048).build_recorder().handle(),
    };
    let router = app(
        state,
        &ServerConfig {
            payload_limit: 1_000_000,
            ..ServerConfig::default()
        },
    );
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0))
        .await
        .unwrap();
    let port = listener.local_addr().unwrap().port();
    let limits = ConnectionLimits {
        max_connections: 16,
        header_timeout: std::time::Duration::from_secs(10),
    };
    tokio::spawn(serve(listener, router, limits, std::future::pending()));

    let prompt = ["the quick brown fox jumps over the lazy dog"; 14].join(" ");
    let runs = 10;
    // One connection kept alive, as clients with a connection pool do; the first
    // request is not timed.
    let results = tokio::task::spawn_blocking(move || {
        let mut socket = TcpStream::connect(("127.0.0.1", port)).unwrap();
        (0..=runs)
            .map(|_| streamed_request(&mut socket, &prompt))
            .skip(1)
            .collect::<Vec<_>>()
    })
    .await
    .unwrap();
    let prefills = shard.prefill_times().split_off(1);
    assert_eq!(prefills.len(), runs);
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let mut rows = Vec::new();
    for ((sent, headers, first), (arrived, done)) in results.into_iter().zip(prefills) {
        let before = arrived.duration_since(sent);
        let prefill = done.duration_since(arrived);
        let after = (sent + first).duration_since(done);
        eprintln!(
            "ttft {:6.2} ms = to prefill {:5.2} + prefill {:5.2} + to first event {:5.2} (headers at {:5.2})",
            ms(first), ms(before), ms(prefill), ms(after), ms(headers)
        );
        rows.push((ms(first), ms(before), ms(prefill), ms(after)));
    }
    let median = |f: fn(&(f64, f64, f64, f64)) -> f64| {
        let mut v: Vec<f64> = rows.iter().map(f).collect();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    eprintln!(
        "median: ttft {:.2} ms, to prefill {:.2}, prefill {:.2}, to first event {:.2}",
        median(|r| r.0),
        median(|r| r.1),
        median(|r| r.2),
        median(|r| r.3)
    );
    let overhead = median(|r| r.1 + r.3);
    assert!(
        overhead < ms(MAX_ROUTER_OVERHEAD),
        "the router adds {overhead:.2} ms to the first token (median over {runs} requests)"
    );
}
