-- When the governance checks of the latest attempt read their state, so that a change
-- such as the kill switch can be compared with the checks that ran after it.
ALTER TABLE deliveries ADD COLUMN checked_at timestamptz;
