//! Not part of the public API: what the integration tests, the fuzz targets and the examples
//! reach beyond it. The parsers a client or an upstream feeds (fuzzed on their own), the
//! token counter and price the billing tests check against, the clock the token tests read,
//! and views into the shared state that only a test asserts on (what the hub retains, what a
//! tier's bucket holds, a provider's queue). Hidden from the docs, with no stability promise:
//! it changes with the code it exposes.

use std::sync::Arc;

use crate::gateway::Gateway;

pub use crate::auth::{unix_now, unix_now_ms};
pub use crate::billing::{
    cost_usd, count_prompt, count_prompt_tokens, count_tokens, count_tools_tokens, warm_up,
    PromptCount,
};
pub use crate::protocol::{delta_parts, parse_client_frame, ClientFrame};
pub use crate::redact::Redactor;
pub use crate::relay::{upstream_body, validate_open};
pub use crate::scheduler::{ANNOUNCE_EVERY, ANNOUNCE_HEAD};
pub use crate::sse::{Event, Parser};
pub use crate::upstream::{chunk_ids, parse_chunk};

/// Users the hub holds an entry for: it forgets a user once nothing of theirs is left.
pub fn tracked_users(gw: &Gateway) -> usize {
    gw.hub.tracked_users()
}

/// Bytes of `user`'s finished streams' logs kept for a late resume.
pub fn retained_bytes(gw: &Gateway, user: &str) -> usize {
    gw.hub.retained_bytes(user)
}

/// Bytes in the replay log of `user`'s stream `id`, while the hub holds it.
pub fn stream_buffered_bytes(gw: &Gateway, user: &str, id: &str) -> Option<usize> {
    gw.hub.get(&user.into(), id).map(|s| s.buffered_bytes())
}

/// Tokens left in `tier`'s tokens-per-minute bucket.
pub fn tier_tokens_available(gw: &Gateway, tier: &str) -> Option<f64> {
    gw.limits.tier_tokens_available(tier)
}

/// Streams running, streams waiting, and waiting per tier, of one provider.
pub type ProviderLoad = (usize, usize, Vec<(Arc<str>, usize)>);

/// The `index`th provider's load.
pub fn provider_load(gw: &Gateway, index: usize) -> Option<ProviderLoad> {
    gw.upstreams.all().get(index).map(|p| p.scheduler.load())
}
