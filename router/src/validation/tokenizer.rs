//! Tokenization off the async runtime: a few OS threads, each with its own
//! tokenizer, take jobs from one queue (a long prompt takes milliseconds of CPU).

use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use tokenizers::{Encoding, Tokenizer};
use tokio::sync::oneshot;

struct Job {
    text: String,
    add_special_tokens: bool,
    reply: oneshot::Sender<Result<Encoding, String>>,
}

pub struct TokenizerPool {
    jobs: mpsc::Sender<Job>,
    workers: usize,
}

impl TokenizerPool {
    /// The workers exit when the pool is dropped.
    pub fn new(tokenizer: Tokenizer, workers: usize) -> std::io::Result<Self> {
        let workers = workers.max(1);
        let (jobs, queue) = mpsc::channel::<Job>();
        let queue = Arc::new(Mutex::new(queue));
        for i in 0..workers {
            let queue = queue.clone();
            let tokenizer = tokenizer.clone();
            std::thread::Builder::new().name(format!("tokenizer-{i}")).spawn(move || work(&tokenizer, &queue))?;
        }
        Ok(Self { jobs, workers })
    }

    pub fn workers(&self) -> usize {
        self.workers
    }

    pub async fn encode(&self, text: String, add_special_tokens: bool) -> Result<Encoding, String> {
        let (reply, answer) = oneshot::channel();
        self.jobs
            .send(Job { text, add_special_tokens, reply })
            .map_err(|_| "tokenizer workers are gone".to_string())?;
        answer.await.map_err(|_| "tokenizer worker dropped the request".to_string())?
    }
}

fn work(tokenizer: &Tokenizer, queue: &Mutex<mpsc::Receiver<Job>>) {
    loop {
        // The lock is held only while waiting for the next job, not while encoding.
        let job = match queue.lock() {
            Ok(queue) => queue.recv(),
            Err(_) => return,
        };
        let Ok(job) = job else { return };
        let encoding = tokenizer.encode(job.text, job.add_special_tokens).map_err(|e| e.to_string());
        // The requester may have gone (client disconnected): nothing to do then.
        let _ = job.reply.send(encoding);
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A word-level tokenizer over a tiny vocabulary, splitting on whitespace.
    pub(crate) fn word_tokenizer() -> Tokenizer {
        let json = r#"{"version":"1.0","truncation":null,"padding":null,"added_tokens":[],"normalizer":null,
            "pre_tokenizer":{"type":"Whitespace"},"post_processor":null,"decoder":null,
            "model":{"type":"WordLevel","vocab":{"<unk>":0,"<s>":1,"</s>":2,"the":3,"capital":4,"of":5,"france":6,"is":7},"unk_token":"<unk>"}}"#;
        json.parse().unwrap()
    }

    #[tokio::test]
    async fn encodes_on_worker_threads() {
        let pool = TokenizerPool::new(word_tokenizer(), 2).unwrap();
        let encodings =
            futures::future::join_all((0..8).map(|_| pool.encode("the capital of france is".into(), true))).await;
        for encoding in encodings {
            let encoding = encoding.unwrap();
            assert_eq!(encoding.get_ids(), &[3, 4, 5, 6, 7]);
            assert_eq!(encoding.get_offsets()[1], (4, 11));
        }
    }
}
