-- How many units of the earlier conversation the token budget trimmed from the prompt.
ALTER TABLE results ADD COLUMN turns_dropped BIGINT NOT NULL DEFAULT 0;
