-- Of prompt_tokens, how many had their KV taken from the inference replica's prefix cache
-- instead of being computed.
ALTER TABLE results ADD COLUMN prompt_tokens_cached BIGINT NOT NULL DEFAULT 0;
