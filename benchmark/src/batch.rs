//! Builds the benchmark's batches: random prompts, greedy decoding that ignores EOS, and
//! KV cache blocks handed out sequentially from block 1 (block 0 is the shard's reserved
//! block), as the router's allocator would for a cache holding nothing else.

use proto::v3::{Batch, NextTokenChooserParameters, Request, StoppingCriteriaParameters};
use rand::Rng;

/// KV blocks one request needs to hold its prompt and every token it generates.
pub fn blocks_per_request(prompt_tokens: u32, max_new_tokens: u32, block_size: u32) -> u32 {
    (prompt_tokens + max_new_tokens).div_ceil(block_size)
}

/// One request per entry of `prompt_lens`, each generating up to `max_new_tokens` tokens,
/// with random prompt token ids below `vocab_size`.
pub fn build_requests(
    prompt_lens: &[u32],
    max_new_tokens: u32,
    block_size: u32,
    vocab_size: u32,
    rng: &mut impl Rng,
) -> Vec<Request> {
    let mut next_block = 1;
    prompt_lens
        .iter()
        .enumerate()
        .map(|(index, &prompt_tokens)| {
            let total_tokens = prompt_tokens + max_new_tokens;
            let block_count = blocks_per_request(prompt_tokens, max_new_tokens, block_size);
            let blocks: Vec<u32> = (next_block..next_block + block_count).collect();
            next_block += block_count;
            let slots = blocks
                .iter()
                .flat_map(|block| block * block_size..(block + 1) * block_size)
                .take(total_tokens as usize)
                .collect();
            Request {
                id: index as u64,
                input_ids: (0..prompt_tokens)
                    .map(|_| rng.random_range(0..vocab_size))
                    .collect(),
                inputs: String::new(),
                parameters: Some(NextTokenChooserParameters::greedy()),
                stopping_parameters: Some(StoppingCriteriaParameters {
                    max_new_tokens,
                    stop_sequences: Vec::new(),
                    ignore_eos_token: true,
                }),
                prefill_logprobs: false,
                top_n_tokens: 0,
                blocks,
                slots,
                cache_len: None,
                chunk_len: None,
            }
        })
        .collect()
}

/// Wraps requests into one batch.
pub fn batch_of(id: u64, requests: Vec<Request>) -> Batch {
    let stopping = |r: &Request| {
        r.stopping_parameters
            .as_ref()
            .map_or(0, |s| s.max_new_tokens)
    };
    Batch {
        id,
        size: requests.len() as u32,
        max_tokens: requests
            .iter()
            .map(|r| r.input_ids.len() as u32 + stopping(r))
            .sum(),
        max_blocks: requests.iter().map(|r| r.blocks.len() as u32).sum(),
        requests,
    }
}

/// Splits requests into consecutive prefill batches of at most `max_prefill_tokens` prompt
/// tokens each (a longer prompt gets a batch of its own), as the router never prefills more
/// at once; batch ids count up from `first_id`.
pub fn prefill_batches(
    requests: Vec<Request>,
    max_prefill_tokens: u32,
    first_id: u64,
) -> Vec<Batch> {
    let mut groups: Vec<Vec<Request>> = Vec::new();
    let mut group_tokens = 0;
    for request in requests {
        let tokens = request.input_ids.len() as u32;
        match groups.last_mut() {
            Some(group) if group_tokens + tokens <= max_prefill_tokens => {
                group_tokens += tokens;
                group.push(request);
            }
            _ => {
                group_tokens = tokens;
                groups.push(vec![request]);
            }
        }
    }
    groups
        .into_iter()
        .zip(first_id..)
        .map(|(group, id)| batch_of(id, group))
        .collect()
}

/// Prompt lengths of the warmup batch: `max_batch_prefill_tokens` split into prompts of at
/// most `max_input_tokens`, as TGI's router builds it.
pub fn warmup_prompt_lens(max_batch_prefill_tokens: u32, max_input_tokens: u32) -> Vec<u32> {
    let mut lens = Vec::new();
    let mut remaining = max_batch_prefill_tokens;
    while remaining > 0 {
        let len = remaining.min(max_input_tokens);
        lens.push(len);
        remaining -= len;
    }
    lens
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{rngs::StdRng, SeedableRng};

    #[test]
    fn blocks_and_slots_are_sequential_from_block_one() {
        let mut rng = StdRng::seed_from_u64(0);
        let batch = batch_of(7, build_requests(&[5, 3], 4, 4, 100, &mut rng));
        assert_eq!(batch.id, 7);
        assert_eq!(batch.size, 2);
        assert_eq!(batch.max_tokens, 9 + 7);
        // 9 tokens -> 3 blocks, 7 tokens -> 2 blocks.
        assert_eq!(batch.requests[0].blocks, vec![1, 2, 3]);
        assert_eq!(batch.requests[1].blocks, vec![4, 5]);
        assert_eq!(batch.max_blocks, 5);
        assert_eq!(batch.requests[0].slots, (4..13).collect::<Vec<u32>>());
        assert_eq!(batch.requests[1].slots, (16..23).collect::<Vec<u32>>());
    }

    #[test]
    fn prompts_have_the_requested_length_and_vocabulary() {
        let mut rng = StdRng::seed_from_u64(1);
        let requests = build_requests(&[64; 3], 1, 16, 10, &mut rng);
        for (index, request) in requests.iter().enumerate() {
            assert_eq!(request.id, index as u64);
            assert_eq!(request.input_ids.len(), 64);
            assert!(request.input_ids.iter().all(|&t| t < 10));
            let stopping = request.stopping_parameters.as_ref().unwrap();
            assert!(stopping.ignore_eos_token);
            assert_eq!(stopping.max_new_tokens, 1);
            assert!(!request.parameters.as_ref().unwrap().do_sample);
        }
    }

    #[test]
    fn prefill_batches_respect_the_token_budget_and_keep_order() {
        let mut rng = StdRng::seed_from_u64(2);
        let requests = build_requests(&[4, 4, 4, 4, 10], 1, 16, 10, &mut rng);
        let batches = prefill_batches(requests, 8, 5);
        let ids: Vec<u64> = batches.iter().map(|b| b.id).collect();
        assert_eq!(ids, vec![5, 6, 7]);
        let members: Vec<Vec<u64>> = batches
            .iter()
            .map(|b| b.requests.iter().map(|r| r.id).collect())
            .collect();
        assert_eq!(members, vec![vec![0, 1], vec![2, 3], vec![4]]);
        assert_eq!(batches[2].max_tokens, 11);
        assert_eq!(batches[0].max_blocks, 2);
    }

    #[test]
    fn warmup_splits_the_prefill_budget_into_max_input_prompts() {
        assert_eq!(warmup_prompt_lens(8192, 2048), vec![2048; 4]);
        assert_eq!(warmup_prompt_lens(5000, 2048), vec![2048, 2048, 904]);
        assert_eq!(warmup_prompt_lens(100, 2048), vec![100]);
    }

    #[test]
    fn blocks_round_up() {
        assert_eq!(blocks_per_request(512, 129, 16), 41);
        assert_eq!(blocks_per_request(16, 0, 16), 1);
    }
}
