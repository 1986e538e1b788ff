-- How a domain was last verified. Revalidation re-checks only domains verified through
-- DNS: a domain the operator marked verified (for example behind DNS the service cannot
-- query) stays verified until an owner runs `domain verify` or the operator acts again.
ALTER TABLE sending_domains
    ADD COLUMN verification_method text NOT NULL DEFAULT 'dns' CHECK (verification_method IN ('dns', 'operator'));

DROP INDEX sending_domains_due;
CREATE INDEX sending_domains_due ON sending_domains (checked_at)
    WHERE status IN ('verified', 'failing') AND verification_method = 'dns';
