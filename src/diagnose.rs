//! Checks of a tenant domain's SPF and DMARC records, from the point of view of a receiver
//! that gets mail this service sent for the domain.
//!
//! The service sends with MAIL FROM equal to the From address and signs with DKIM `d=` equal
//! to the From domain. So SPF is checked at the tenant domain itself, and DMARC passes
//! whenever SPF or DKIM passes. What remains to check is what the tenant publishes: an SPF
//! record that authorizes the platform within the 10-lookup limit of RFC 7208, and a DMARC
//! record that receivers can parse. Each [`Finding`] states what a receiver will conclude and
//! what to publish instead.
//!
//! The parsing of SPF terms and DMARC tags is pure. Only [`check_spf`] and [`check_dmarc`]
//! query DNS, through a [`TxtSource`].

use std::collections::{BTreeSet, HashMap};

use crate::dns::{TxtAnswer, TxtSource};

/// Maximum number of DNS-querying SPF terms in one evaluation (RFC 7208 section 4.6.4).
const MAX_SPF_LOOKUPS: usize = 10;

/// Maximum depth of nested include and redirect records that the check fetches. A deeper
/// chain needs more than [`MAX_SPF_LOOKUPS`] lookups anyway, so the verdict does not change.
const MAX_INCLUDE_DEPTH: usize = 11;

/// Lookup count after which the check stops fetching nested records. It bounds the DNS
/// queries of one check, and any count above 10 is already a permerror.
const LOOKUP_COUNT_CAP: usize = 40;

/// Receiver-visible result of one check.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Ok,
    Warning,
    Error,
}

/// One conclusion about a DNS record, with the change that fixes it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Finding {
    /// "SPF", "DKIM" or "DMARC".
    pub record: &'static str,
    pub severity: Severity,
    /// Stable snake_case code, such as `spf_missing`.
    pub code: &'static str,
    /// One or two sentences on the result a receiver gets, and the reason.
    pub finding: String,
    /// The record to publish or the change to make, or `None` when nothing needs to change.
    pub fix: Option<String>,
}

impl Finding {
    fn new(record: &'static str, severity: Severity, code: &'static str, finding: String, fix: Option<String>) -> Self {
        Finding { record, severity, code, finding, fix }
    }
}

/// Sorts errors first, then warnings, then OK findings, keeping the order within each.
fn sort_by_severity(findings: &mut [Finding]) {
    findings.sort_by_key(|finding| match finding.severity {
        Severity::Error => 0,
        Severity::Warning => 1,
        Severity::Ok => 2,
    });
}

/// Lowercases a domain name and drops a trailing dot, so that names compare as DNS does.
fn normalize_domain(name: &str) -> String {
    name.trim().trim_end_matches('.').to_ascii_lowercase()
}

// ---------------------------------------------------------------------------------------
// SPF parsing
// ---------------------------------------------------------------------------------------

/// SPF qualifier of a mechanism. A mechanism without one has [`Qualifier::Pass`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Qualifier {
    Pass,
    Fail,
    SoftFail,
    Neutral,
}

impl Qualifier {
    fn from_symbol(symbol: char) -> Option<Self> {
        match symbol {
            '+' => Some(Qualifier::Pass),
            '-' => Some(Qualifier::Fail),
            '~' => Some(Qualifier::SoftFail),
            '?' => Some(Qualifier::Neutral),
            _ => None,
        }
    }

    /// Returns the `all` term with this qualifier, such as `~all`.
    fn all_term(self) -> &'static str {
        match self {
            Qualifier::Pass => "+all",
            Qualifier::Fail => "-all",
            Qualifier::SoftFail => "~all",
            Qualifier::Neutral => "?all",
        }
    }

    /// Returns the name of the SPF result that a match with this qualifier gives.
    fn result(self) -> &'static str {
        match self {
            Qualifier::Pass => "pass",
            Qualifier::Fail => "fail",
            Qualifier::SoftFail => "softfail",
            Qualifier::Neutral => "neutral",
        }
    }
}

/// Meaning of one SPF term, as far as the checks need it.
#[derive(Debug, Clone, PartialEq, Eq)]
enum TermKind {
    /// `include:<domain>`: one DNS lookup, plus those of the included record.
    Include { qualifier: Qualifier, domain: String },
    /// `a`, `mx`, `ptr` or `exists`: one DNS lookup each.
    Lookup,
    /// `ip4` or `ip6`: no lookup.
    Address,
    /// `all`: matches every sender, so evaluation stops here.
    All(Qualifier),
    /// `redirect=<domain>`: one DNS lookup, plus those of the target record.
    Redirect(String),
    /// Any other modifier, such as `exp=`, and terms this check does not recognize.
    Other,
}

/// One whitespace-separated term of an SPF record, with its original text.
#[derive(Debug, Clone, PartialEq, Eq)]
struct SpfTerm {
    text: String,
    kind: TermKind,
}

/// Returns whether a TXT record is an SPF record: `v=spf1`, in any case, followed by a
/// space or the end of the record (RFC 7208 section 4.5).
fn is_spf_record(txt: &str) -> bool {
    let Some(version) = txt.get(..6) else {
        return false;
    };
    version.eq_ignore_ascii_case("v=spf1") && txt[6..].chars().next().is_none_or(|next| next == ' ')
}

/// Splits an SPF record into its terms after the version, or returns `None` when the TXT
/// record is not an SPF record.
fn parse_spf(txt: &str) -> Option<Vec<SpfTerm>> {
    if !is_spf_record(txt) {
        return None;
    }
    Some(txt[6..].split_whitespace().map(parse_spf_term).collect())
}

// NOTE: an unknown mechanism or a malformed term makes receivers return permerror, but the
// parser files it as `TermKind::Other` and no finding reports it.
fn parse_spf_term(text: &str) -> SpfTerm {
    let kind = match modifier_parts(text) {
        Some((name, value)) if name.eq_ignore_ascii_case("redirect") => TermKind::Redirect(normalize_domain(value)),
        Some(_) => TermKind::Other,
        None => parse_mechanism(text),
    };
    SpfTerm { text: text.to_string(), kind }
}

/// Splits a modifier (`name=value`) into name and value. A mechanism has no `=` before its
/// first `:` or `/`, so it returns `None`.
fn modifier_parts(text: &str) -> Option<(&str, &str)> {
    let (name, value) = text.split_once('=')?;
    if name.is_empty() || name.contains([':', '/']) {
        return None;
    }
    Some((name, value))
}

fn parse_mechanism(text: &str) -> TermKind {
    let mut rest = text;
    let mut qualifier = Qualifier::Pass;
    if let Some(first) = text.chars().next() {
        if let Some(explicit) = Qualifier::from_symbol(first) {
            qualifier = explicit;
            rest = &text[1..];
        }
    }

    let name_end = rest.find([':', '/']).unwrap_or(rest.len());
    let (name, argument) = rest.split_at(name_end);
    let domain = argument.strip_prefix(':').map(normalize_domain);

    match (name.to_ascii_lowercase().as_str(), domain) {
        ("all", None) if argument.is_empty() => TermKind::All(qualifier),
        ("include", Some(domain)) if !domain.is_empty() => TermKind::Include { qualifier, domain },
        ("a" | "mx" | "ptr" | "exists", _) => TermKind::Lookup,
        ("ip4" | "ip6", _) => TermKind::Address,
        _ => TermKind::Other,
    }
}

/// Counts the lookups an SPF term needs by itself, without those of a nested record.
fn own_lookups(kind: &TermKind) -> usize {
    match kind {
        TermKind::Include { .. } | TermKind::Lookup | TermKind::Redirect(_) => 1,
        TermKind::Address | TermKind::All(_) | TermKind::Other => 0,
    }
}

/// Returns the record text with `include:<platform>` before its `all` term, or before its
/// `redirect` modifier, or at the end. An include of the platform that was out of place,
/// such as after `all`, is moved there.
fn record_with_include(terms: &[SpfTerm], platform_include: &str) -> String {
    let is_platform = |term: &SpfTerm| matches!(&term.kind, TermKind::Include { domain, .. } if domain == platform_include);
    let mut texts: Vec<&str> = Vec::new();
    let mut position = None;
    for term in terms.iter().filter(|term| !is_platform(term)) {
        if position.is_none() && matches!(term.kind, TermKind::All(_) | TermKind::Redirect(_)) {
            position = Some(texts.len());
        }
        texts.push(&term.text);
    }

    let include = format!("include:{platform_include}");
    texts.insert(position.unwrap_or(texts.len()), &include);
    format!("v=spf1 {}", texts.join(" "))
}

/// Merges several SPF records into one: every mechanism once, the platform include added
/// when missing, and the first record's `all` term (or `~all`) at the end. Redirects are
/// dropped because one record can follow only one.
fn merge_spf_records(records: &[Vec<SpfTerm>], platform_include: &str) -> String {
    let mut merged: Vec<String> = Vec::new();
    let mut seen: BTreeSet<String> = BTreeSet::new();
    let mut all_term: Option<Qualifier> = None;
    let mut has_platform = false;

    for term in records.iter().flatten() {
        match &term.kind {
            TermKind::All(qualifier) => {
                all_term.get_or_insert(*qualifier);
            }
            TermKind::Redirect(_) => {}
            kind => {
                if let TermKind::Include { domain, .. } = kind {
                    has_platform |= *domain == platform_include;
                }
                if seen.insert(term.text.to_ascii_lowercase()) {
                    merged.push(term.text.clone());
                }
            }
        }
    }

    if !has_platform {
        merged.push(format!("include:{platform_include}"));
    }
    merged.push(all_term.unwrap_or(Qualifier::SoftFail).all_term().to_string());
    format!("v=spf1 {}", merged.join(" "))
}

// ---------------------------------------------------------------------------------------
// SPF evaluation over fetched records
// ---------------------------------------------------------------------------------------

/// A nested record fetched for an include or redirect.
#[derive(Debug, Clone)]
enum NestedRecord {
    // NOTE: when the name has several SPF records, receivers return permerror for it, but the
    // check uses the first one.
    Spf(Vec<SpfTerm>),
    NoSpf,
    Unavailable(String),
}

impl NestedRecord {
    fn from_answer(answer: TxtAnswer) -> Self {
        match answer {
            TxtAnswer::Records(records) => match records.iter().find_map(|txt| parse_spf(txt)) {
                Some(terms) => NestedRecord::Spf(terms),
                None => NestedRecord::NoSpf,
            },
            TxtAnswer::NoRecords { .. } => NestedRecord::NoSpf,
            TxtAnswer::Unavailable(reason) => NestedRecord::Unavailable(reason),
        }
    }
}

/// Result of the walk over the domain's SPF record and its nested records.
#[derive(Debug, Default)]
struct SpfWalk {
    /// DNS-querying terms, counted recursively through include and redirect.
    lookups: usize,
    /// Lookups of each top-level term that needs any, as (term text, count).
    lookups_by_term: Vec<(String, usize)>,
    /// Whether a pass-qualified include or redirect reaches the platform include.
    reaches_platform: bool,
    /// The `all` qualifier that ends the domain's evaluation, following redirects. `None`
    /// means no `all` term, so unmatched mail gets the default result `neutral`.
    final_all: Option<Qualifier>,
    /// The record whose `+all` lets every sender pass for the domain, and that term's text.
    pass_all_at: Option<(String, String)>,
    /// The first chain of includes or redirects that returns to a name already on it.
    include_loop: Option<Vec<String>>,
    /// Nested names whose TXT lookup failed, with the reason.
    unavailable: Vec<(String, String)>,
    /// Names reached by include or redirect that have no SPF record, each with whether it
    /// comes before the platform include in evaluation order. Receivers return permerror
    /// when evaluation reaches such a name (RFC 7208 section 5.2).
    void_names: Vec<(String, bool)>,
    /// The lookup count once the platform include has been evaluated, in evaluation order.
    /// Mail from the platform matches there, so terms after it are not evaluated for it.
    platform_reached_after: Option<usize>,
    /// Nested names that are needed but not fetched yet.
    missing: BTreeSet<String>,
    /// Whether the walk stopped early at the depth or count limits, so `lookups` is a
    /// minimum.
    truncated: bool,
}

/// Walks the domain's SPF record in evaluation order and counts lookups, descending into
/// the nested records in `fetched`. Names not in `fetched` end up in `missing`.
fn walk_spf(domain: &str, terms: &[SpfTerm], platform_include: &str, fetched: &HashMap<String, NestedRecord>) -> SpfWalk {
    let mut walker = SpfWalker { platform_include, fetched, walk: SpfWalk::default(), path: vec![domain.to_string()] };
    walker.walk_record(domain, terms, true, true);
    walker.walk
}

struct SpfWalker<'a> {
    platform_include: &'a str,
    fetched: &'a HashMap<String, NestedRecord>,
    walk: SpfWalk,
    /// Names from the domain down to the record being walked, to detect loops.
    path: Vec<String>,
}

impl SpfWalker<'_> {
    /// Walks one record. `authorizes` is false below an include with a qualifier other than
    /// `+`, because a match there does not make the sender pass. `top_level` is true for the
    /// domain's record and the records it redirects to.
    fn walk_record(&mut self, name: &str, terms: &[SpfTerm], authorizes: bool, top_level: bool) {
        let mut redirect: Option<(&SpfTerm, &str)> = None;

        for term in terms {
            match &term.kind {
                TermKind::All(qualifier) => {
                    self.note_all(name, term, *qualifier, authorizes, top_level);
                    // Evaluation ends at `all`. RFC 7208 also ignores `redirect` in a record
                    // that has `all`.
                    return;
                }
                TermKind::Redirect(target) => redirect = Some((term, target)),
                TermKind::Include { qualifier, domain } => {
                    let passes = authorizes && *qualifier == Qualifier::Pass;
                    let is_platform = passes && domain == self.platform_include;
                    self.walk.reaches_platform |= is_platform;
                    self.count_term(term, |walker| walker.descend(domain, passes, false));
                    if is_platform && self.walk.platform_reached_after.is_none() {
                        self.walk.platform_reached_after = Some(self.walk.lookups);
                    }
                }
                TermKind::Lookup | TermKind::Address | TermKind::Other => self.count_term(term, |_| {}),
            }
        }

        // RFC 7208 applies `redirect` only after every mechanism fails to match, wherever it
        // appears in the record.
        if let Some((term, target)) = redirect {
            let is_platform = authorizes && target == self.platform_include;
            self.walk.reaches_platform |= is_platform;
            self.count_term(term, |walker| walker.descend(target, authorizes, top_level));
            if is_platform && self.walk.platform_reached_after.is_none() {
                self.walk.platform_reached_after = Some(self.walk.lookups);
            }
        }
    }

    /// Counts the term's own lookup, runs `descend` for its nested record, and keeps the
    /// total per term for the domain's own record.
    fn count_term(&mut self, term: &SpfTerm, descend: impl FnOnce(&mut Self)) {
        let before = self.walk.lookups;
        self.walk.lookups += own_lookups(&term.kind);
        descend(self);

        let added = self.walk.lookups - before;
        if self.path.len() == 1 && added > 0 {
            self.walk.lookups_by_term.push((term.text.clone(), added));
        }
    }

    fn note_all(&mut self, name: &str, term: &SpfTerm, qualifier: Qualifier, authorizes: bool, top_level: bool) {
        if top_level {
            self.walk.final_all = Some(qualifier);
        }
        if qualifier == Qualifier::Pass && authorizes && self.walk.pass_all_at.is_none() {
            self.walk.pass_all_at = Some((name.to_string(), term.text.clone()));
        }
    }

    /// Walks the record at `target`, unless it would loop, go too deep, or is not fetched yet.
    fn descend(&mut self, target: &str, authorizes: bool, top_level: bool) {
        if self.path.iter().any(|name| name == target) {
            if self.walk.include_loop.is_none() {
                let mut chain = self.path.clone();
                chain.push(target.to_string());
                self.walk.include_loop = Some(chain);
            }
            return;
        }
        if self.path.len() > MAX_INCLUDE_DEPTH || self.walk.lookups > LOOKUP_COUNT_CAP {
            self.walk.truncated = true;
            return;
        }

        let fetched = self.fetched;
        match fetched.get(target) {
            None => {
                self.walk.missing.insert(target.to_string());
            }
            Some(NestedRecord::Unavailable(reason)) => {
                if !self.walk.unavailable.iter().any(|(name, _)| name == target) {
                    self.walk.unavailable.push((target.to_string(), reason.clone()));
                }
            }
            Some(NestedRecord::NoSpf) => {
                if !self.walk.void_names.iter().any(|(name, _)| name == target) {
                    let before_platform = self.walk.platform_reached_after.is_none();
                    self.walk.void_names.push((target.to_string(), before_platform));
                }
            }
            Some(NestedRecord::Spf(terms)) => {
                self.path.push(target.to_string());
                self.walk_record(target, terms, authorizes, top_level);
                self.path.pop();
            }
        }
    }
}

/// Fetches the nested records the walk needs, one level of includes per round, and returns
/// the walk over all of them.
async fn fetch_and_walk_spf(domain: &str, terms: &[SpfTerm], platform_include: &str, dns: &dyn TxtSource) -> SpfWalk {
    let mut fetched: HashMap<String, NestedRecord> = HashMap::new();
    // Each round fetches one more level, and the walk descends at most MAX_INCLUDE_DEPTH levels.
    for _ in 0..=MAX_INCLUDE_DEPTH + 1 {
        let walk = walk_spf(domain, terms, platform_include, &fetched);
        if walk.missing.is_empty() {
            return walk;
        }
        let answers = futures_util::future::join_all(walk.missing.iter().map(|name| dns.txt(name))).await;
        for (name, answer) in walk.missing.into_iter().zip(answers) {
            fetched.insert(name, NestedRecord::from_answer(answer));
        }
    }

    let mut walk = walk_spf(domain, terms, platform_include, &fetched);
    walk.truncated |= !walk.missing.is_empty();
    walk
}

// ---------------------------------------------------------------------------------------
// SPF findings
// ---------------------------------------------------------------------------------------

/// Checks the SPF record of `domain` as a receiver evaluates it for mail sent through the
/// platform, whose servers are listed at `platform_include`.
///
/// Fetches the domain's TXT records and, recursively, the records its `include` and
/// `redirect` terms name. Returns every finding that applies, errors first.
pub async fn check_spf(domain: &str, platform_include: &str, dns: &dyn TxtSource) -> Vec<Finding> {
    let answer = dns.txt(&normalize_domain(domain)).await;
    check_spf_answer(domain, platform_include, &answer, dns).await
}

/// Runs [`check_spf`] on the domain's TXT lookup result that the caller already has, so
/// only the nested records are fetched.
pub async fn check_spf_answer(domain: &str, platform_include: &str, answer: &TxtAnswer, dns: &dyn TxtSource) -> Vec<Finding> {
    let domain = normalize_domain(domain);
    let platform_include = normalize_domain(platform_include);

    let records: Vec<Vec<SpfTerm>> = match answer {
        TxtAnswer::Records(txts) => txts.iter().filter_map(|txt| parse_spf(txt)).collect(),
        TxtAnswer::NoRecords { .. } => Vec::new(),
        TxtAnswer::Unavailable(reason) => return vec![spf_unavailable(&domain, &[(domain.clone(), reason.clone())])],
    };

    match records.as_slice() {
        [] => vec![spf_missing(&domain, &platform_include)],
        [terms] => {
            let walk = fetch_and_walk_spf(&domain, terms, &platform_include, dns).await;
            spf_findings(&domain, terms, &platform_include, &walk)
        }
        several => vec![spf_multiple(&domain, several, &platform_include)],
    }
}

/// Turns the walk over the domain's only SPF record into findings, errors first.
fn spf_findings(domain: &str, terms: &[SpfTerm], platform_include: &str, walk: &SpfWalk) -> Vec<Finding> {
    let mut findings = Vec::new();

    // While a nested lookup has failed, the platform include may be in the record that
    // could not be fetched, so a missing include is not reported.
    if !walk.reaches_platform && walk.unavailable.is_empty() {
        findings.push(spf_include_missing(domain, terms, platform_include, walk.final_all));
    }
    if let Some(chain) = &walk.include_loop {
        findings.push(spf_include_loop(domain, chain));
    } else if walk.lookups > MAX_SPF_LOOKUPS {
        findings.push(spf_too_many_lookups(domain, platform_include, walk));
    }
    for (name, before_platform) in &walk.void_names {
        let platform_passes = walk.reaches_platform && !before_platform;
        findings.push(spf_include_void(domain, name, platform_include, platform_passes));
    }
    if let Some((name, term)) = &walk.pass_all_at {
        findings.push(spf_all_pass(domain, name, term));
    }
    if !walk.unavailable.is_empty() {
        findings.push(spf_unavailable(domain, &walk.unavailable));
    }

    let has_error = findings.iter().any(|finding| finding.severity == Severity::Error);
    if !has_error && walk.unavailable.is_empty() {
        findings.push(spf_ok(domain, platform_include, walk));
    }

    sort_by_severity(&mut findings);
    findings
}

fn spf_missing(domain: &str, platform_include: &str) -> Finding {
    Finding::new(
        "SPF",
        Severity::Error,
        "spf_missing",
        format!("{domain} has no SPF record, so receivers get the SPF result none and DMARC can pass only through DKIM."),
        Some(format!("Publish a TXT record at {domain}: v=spf1 include:{platform_include} ~all")),
    )
}

fn spf_multiple(domain: &str, records: &[Vec<SpfTerm>], platform_include: &str) -> Finding {
    Finding::new(
        "SPF",
        Severity::Error,
        "spf_multiple",
        format!(
            "{domain} has {} SPF records, so receivers return permerror (RFC 7208 section 4.5) and SPF fails for all mail from {domain}.",
            records.len()
        ),
        Some(format!(
            "Replace them with one TXT record at {domain} that contains the mechanisms of all of them: {}",
            merge_spf_records(records, platform_include)
        )),
    )
}

fn spf_include_missing(domain: &str, terms: &[SpfTerm], platform_include: &str, final_all: Option<Qualifier>) -> Finding {
    let result = match final_all {
        Some(qualifier) => format!("the result of its `{}` term: {}", qualifier.all_term(), qualifier.result()),
        None => "the result neutral, because the record has no `all` term".to_string(),
    };
    Finding::new(
        "SPF",
        Severity::Error,
        "spf_include_missing",
        format!(
            "The SPF record at {domain} does not reach include:{platform_include}, directly or through its includes, \
             so it does not authorize this service's servers. Mail from this service gets {result}."
        ),
        Some(format!(
            "Add include:{platform_include} before the `all` term of the record at {domain}: {}",
            record_with_include(terms, platform_include)
        )),
    )
}

/// Returns the lookup count at the platform include when it is within the limit. Evaluation
/// stops at the first match, so mail from the platform then still passes.
fn platform_within_limit(walk: &SpfWalk) -> Option<usize> {
    walk.platform_reached_after.filter(|lookups| *lookups <= MAX_SPF_LOOKUPS)
}

fn spf_too_many_lookups(domain: &str, platform_include: &str, walk: &SpfWalk) -> Finding {
    let at_least = if walk.truncated { "at least " } else { "" };
    let by_term: Vec<String> = walk.lookups_by_term.iter().map(|(term, count)| format!("{term} {count}")).collect();
    let (severity, consequence) = match platform_within_limit(walk) {
        Some(reached) => (
            Severity::Warning,
            format!(
                "Mail from this service still passes, because evaluation reaches include:{platform_include} after {reached} \
                 lookups and stops at the match, but mail from senders listed after it gets permerror."
            ),
        ),
        None => (Severity::Error, "Receivers return permerror, so SPF fails.".to_string()),
    };
    Finding::new(
        "SPF",
        severity,
        "spf_too_many_lookups",
        format!(
            "Evaluating the SPF record at {domain} needs {at_least}{} DNS lookups ({}), more than the {MAX_SPF_LOOKUPS} that \
             RFC 7208 section 4.6.4 allows. {consequence}",
            walk.lookups,
            by_term.join(", ")
        ),
        Some(format!(
            "Remove the includes of services that no longer send mail for {domain}, or replace an include with the ip4: and \
             ip6: ranges it lists, until at most {MAX_SPF_LOOKUPS} lookups remain."
        )),
    )
}

fn spf_include_void(domain: &str, name: &str, platform_include: &str, platform_passes: bool) -> Finding {
    let (severity, consequence) = if platform_passes {
        (Severity::Warning, format!("Mail from this service still passes, because include:{platform_include} comes first and matches."))
    } else {
        (Severity::Error, "Mail from this service fails SPF.".to_string())
    };
    let fix = if name == platform_include {
        format!(
            "The platform's own include {platform_include} has no SPF record. This is for the platform's operator: publish it, \
             or set domains.spf_include to the name that has it."
        )
    } else {
        format!("Remove {name} from the SPF record at {domain}, or correct the name if it is a typo.")
    };
    Finding::new(
        "SPF",
        severity,
        "spf_include_void",
        format!(
            "The SPF record at {domain} refers to {name}, which has no SPF record, so receivers that reach it return \
             permerror (RFC 7208 section 5.2). {consequence}"
        ),
        Some(fix),
    )
}

fn spf_include_loop(domain: &str, chain: &[String]) -> Finding {
    let (including, included) = match chain {
        [.., including, included] => (including.as_str(), included.as_str()),
        _ => (domain, domain),
    };
    Finding::new(
        "SPF",
        Severity::Error,
        "spf_too_many_lookups",
        format!(
            "The SPF record at {domain} loops through {}, so evaluation repeats until it passes the limit of \
             {MAX_SPF_LOOKUPS} DNS lookups and receivers return permerror.",
            chain.join(" -> ")
        ),
        Some(format!("Remove the include or redirect of {included} from the SPF record at {including}.")),
    )
}

fn spf_all_pass(domain: &str, name: &str, term: &str) -> Finding {
    let location =
        if name == domain { format!("The SPF record at {domain}") } else { format!("The SPF record at {name}, which {domain} includes,") };
    Finding::new(
        "SPF",
        Severity::Warning,
        "spf_all_pass",
        format!("{location} ends with `{term}`, so any server on the internet passes SPF for {domain}."),
        Some(format!(
            "Replace `{term}` with `~all` or `-all` in the record at {name}, so that only the listed servers pass. \
             If you do not control that record, remove the include that reaches it."
        )),
    )
}

fn spf_unavailable(domain: &str, failures: &[(String, String)]) -> Finding {
    let lookups: Vec<String> = failures.iter().map(|(name, reason)| format!("{name} ({reason})")).collect();
    Finding::new(
        "SPF",
        Severity::Warning,
        "spf_unavailable",
        format!(
            "The TXT lookup failed for {}, so this check cannot tell how receivers evaluate the SPF record of {domain}.",
            lookups.join(", ")
        ),
        Some("Run the check again later. If it keeps failing, check that the name servers for those names answer TXT queries.".to_string()),
    )
}

fn spf_ok(domain: &str, platform_include: &str, walk: &SpfWalk) -> Finding {
    let lookups = walk.lookups;
    let finding = match platform_within_limit(walk) {
        Some(reached) if lookups > MAX_SPF_LOOKUPS => format!(
            "{domain} has one SPF record, and evaluation reaches include:{platform_include} after {reached} of the \
             {MAX_SPF_LOOKUPS} allowed DNS lookups, so receivers authorize this service's servers."
        ),
        _ => format!(
            "{domain} has one SPF record, it reaches include:{platform_include}, and evaluating it needs {lookups} of the \
             {MAX_SPF_LOOKUPS} allowed DNS lookups, so receivers authorize this service's servers."
        ),
    };
    Finding::new("SPF", Severity::Ok, "spf_ok", finding, None)
}

// ---------------------------------------------------------------------------------------
// DMARC parsing
// ---------------------------------------------------------------------------------------

/// DMARC policy, the `p=` and `sp=` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Policy {
    None,
    Quarantine,
    Reject,
}

impl Policy {
    fn parse(value: &str) -> Option<Self> {
        match value.to_ascii_lowercase().as_str() {
            "none" => Some(Policy::None),
            "quarantine" => Some(Policy::Quarantine),
            "reject" => Some(Policy::Reject),
            _ => None,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Policy::None => "none",
            Policy::Quarantine => "quarantine",
            Policy::Reject => "reject",
        }
    }
}

/// The parts of a DMARC record that the checks report.
#[derive(Debug, Clone, PartialEq, Eq)]
struct DmarcRecord {
    policy: Policy,
    /// `sp=`, kept only for a record inherited from the organizational domain.
    subdomain_policy: Option<Policy>,
    /// `adkim=` and `aspf=`: `r` (relaxed, the default) or `s` (strict).
    dkim_alignment: char,
    spf_alignment: char,
    has_rua: bool,
}

/// Reason a DMARC record is invalid, worded to follow "The DMARC record at X".
#[derive(Debug, Clone, PartialEq, Eq)]
enum DmarcError {
    Unparsable(String),
    MissingPolicy,
    InvalidPolicy { tag: &'static str, value: String },
}

impl DmarcError {
    fn describe(&self) -> String {
        match self {
            DmarcError::Unparsable(reason) => format!("is not a valid tag list: {reason}"),
            DmarcError::MissingPolicy => "has no p= tag".to_string(),
            DmarcError::InvalidPolicy { tag, value } => format!("has {tag}={value}, which is not none, quarantine or reject"),
        }
    }
}

/// Returns whether a TXT record is a DMARC record: its first tag is `v=DMARC1`, with the value
/// in exactly that case (RFC 7489).
fn is_dmarc_record(txt: &str) -> bool {
    let first = txt.split(';').next().unwrap_or_default();
    match first.split_once('=') {
        Some((name, value)) => name.trim().eq_ignore_ascii_case("v") && value.trim() == "DMARC1",
        None => false,
    }
}

/// Splits a tag list (`tag=value; tag=value`) into tags by lowercased name. Empty parts,
/// such as after a trailing `;`, are skipped. A part without `=`, an invalid tag name or a
/// repeated tag makes the whole list invalid, as in the DKIM tag-list syntax that DMARC uses.
fn parse_tags(txt: &str) -> Result<HashMap<String, String>, String> {
    let mut tags = HashMap::new();
    for part in txt.split(';').map(str::trim).filter(|part| !part.is_empty()) {
        let Some((name, value)) = part.split_once('=') else {
            return Err(format!("`{part}` is not a tag=value pair"));
        };
        let name = name.trim().to_ascii_lowercase();
        let valid_name = name.starts_with(|c: char| c.is_ascii_alphabetic()) && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !valid_name {
            return Err(format!("`{part}` has an invalid tag name"));
        }
        if tags.insert(name.clone(), value.trim().to_string()).is_some() {
            return Err(format!("the tag {name} appears more than once"));
        }
    }
    Ok(tags)
}

/// Parses a DMARC record. `p=` is required. `sp=` is checked only when `inherited`, because
/// only then does it apply, and an invalid `sp=` then invalidates the record as a missing
/// `p=` does.
fn parse_dmarc(txt: &str, inherited: bool) -> Result<DmarcRecord, DmarcError> {
    let tags = parse_tags(txt).map_err(DmarcError::Unparsable)?;
    let policy_value = tags.get("p").ok_or(DmarcError::MissingPolicy)?;
    let policy = Policy::parse(policy_value).ok_or_else(|| DmarcError::InvalidPolicy { tag: "p", value: policy_value.clone() })?;
    let subdomain_policy = match tags.get("sp") {
        Some(value) if inherited => {
            Some(Policy::parse(value).ok_or_else(|| DmarcError::InvalidPolicy { tag: "sp", value: value.clone() })?)
        }
        _ => None,
    };

    Ok(DmarcRecord {
        policy,
        subdomain_policy,
        dkim_alignment: alignment_mode(tags.get("adkim")),
        spf_alignment: alignment_mode(tags.get("aspf")),
        has_rua: tags.get("rua").is_some_and(|value| !value.is_empty()),
    })
}

/// Returns `s` for strict alignment and `r` otherwise, because relaxed is the default.
// NOTE: a value other than r or s also counts as relaxed, and no finding reports it.
fn alignment_mode(value: Option<&String>) -> char {
    match value {
        Some(mode) if mode.eq_ignore_ascii_case("s") => 's',
        _ => 'r',
    }
}

/// Returns the last two labels of `domain`, or `None` when it has two labels or fewer.
// NOTE: RFC 7489 finds the organizational domain with the Public Suffix List.
// Two labels is an approximation that is wrong under suffixes such as co.uk.
fn organizational_domain(domain: &str) -> Option<String> {
    let labels: Vec<&str> = domain.split('.').collect();
    if labels.len() <= 2 {
        return None;
    }
    Some(labels[labels.len() - 2..].join("."))
}

// ---------------------------------------------------------------------------------------
// DMARC findings
// ---------------------------------------------------------------------------------------

/// Checks which DMARC policy receivers apply to mail from `domain`, and whether mail from
/// this service aligns with it.
///
/// Looks up `_dmarc.<domain>` and, when it has no DMARC record, the record of the
/// organizational domain. Returns every finding that applies, errors first.
pub async fn check_dmarc(domain: &str, dns: &dyn TxtSource) -> Vec<Finding> {
    let domain = normalize_domain(domain);
    let own_name = format!("_dmarc.{domain}");

    match dmarc_records(dns, &own_name).await {
        Err(reason) => return vec![dmarc_unavailable(&domain, &own_name, &reason)],
        Ok(records) if !records.is_empty() => return dmarc_findings(&domain, &own_name, None, &records),
        Ok(_) => {}
    }

    let Some(organizational) = organizational_domain(&domain) else {
        return vec![dmarc_missing(&domain, None)];
    };
    let organizational_name = format!("_dmarc.{organizational}");
    match dmarc_records(dns, &organizational_name).await {
        Err(reason) => vec![dmarc_unavailable(&domain, &organizational_name, &reason)],
        Ok(records) if records.is_empty() => vec![dmarc_missing(&domain, Some(&organizational_name))],
        Ok(records) => dmarc_findings(&domain, &organizational_name, Some(&organizational), &records),
    }
}

/// Returns the DMARC records at `name`, or the reason when the lookup failed.
async fn dmarc_records(dns: &dyn TxtSource, name: &str) -> Result<Vec<String>, String> {
    match dns.txt(name).await {
        TxtAnswer::Records(txts) => Ok(txts.into_iter().filter(|txt| is_dmarc_record(txt)).collect()),
        TxtAnswer::NoRecords { .. } => Ok(Vec::new()),
        TxtAnswer::Unavailable(reason) => Err(reason),
    }
}

/// Turns the DMARC records found at `name` into findings, errors first. `inherited_from` is
/// the organizational domain when the records are not at the domain's own `_dmarc` name.
fn dmarc_findings(domain: &str, name: &str, inherited_from: Option<&str>, records: &[String]) -> Vec<Finding> {
    let [txt] = records else {
        return vec![dmarc_multiple(domain, name, records.len())];
    };
    let record = match parse_dmarc(txt, inherited_from.is_some()) {
        Ok(record) => record,
        Err(error) => return vec![dmarc_invalid(domain, name, &error)],
    };

    // A subdomain that inherits the organizational record gets its sp= policy, or p= when
    // the record has no sp= (RFC 7489 section 6.6.3). `parse_dmarc` keeps sp= only then.
    let (tag, policy) = match record.subdomain_policy {
        Some(subdomain_policy) => ("sp", subdomain_policy),
        None => ("p", record.policy),
    };

    let mut findings = Vec::new();
    if policy == Policy::None {
        findings.push(dmarc_policy_none(domain, name, tag, record.has_rua));
    }
    findings.push(dmarc_aligned(domain, name, inherited_from, tag, policy, &record));
    sort_by_severity(&mut findings);
    findings
}

fn dmarc_missing(domain: &str, organizational_name: Option<&str>) -> Finding {
    let searched = match organizational_name {
        Some(organizational_name) => format!("Neither _dmarc.{domain} nor {organizational_name} has a DMARC record"),
        None => format!("_dmarc.{domain} has no DMARC record"),
    };
    Finding::new(
        "DMARC",
        Severity::Warning,
        "dmarc_missing",
        format!("{searched}, so receivers apply their own local policy to mail from {domain} that fails SPF and DKIM."),
        Some(format!(
            "Publish a TXT record at _dmarc.{domain}: v=DMARC1; p=quarantine; adkim=r; aspf=r \
             (add rua=mailto:<address> to receive aggregate reports)."
        )),
    )
}

fn dmarc_multiple(domain: &str, name: &str, count: usize) -> Finding {
    Finding::new(
        "DMARC",
        Severity::Error,
        "dmarc_multiple",
        format!("{name} has {count} DMARC records, so receivers apply no DMARC policy to mail from {domain} (RFC 7489 section 6.6.3)."),
        Some(format!("Delete all but one of the TXT records at {name} that start with v=DMARC1.")),
    )
}

fn dmarc_invalid(domain: &str, name: &str, error: &DmarcError) -> Finding {
    let fix = match error {
        DmarcError::Unparsable(_) => format!("Write the record at {name} as tag=value pairs separated by `;`, each tag once."),
        DmarcError::MissingPolicy | DmarcError::InvalidPolicy { tag: "p", .. } => {
            format!("Set p=quarantine in the record at {name}, or p=none while you collect reports, or p=reject.")
        }
        DmarcError::InvalidPolicy { tag, .. } => format!("Set {tag}= to none, quarantine or reject in the record at {name}, or remove it."),
    };
    Finding::new(
        "DMARC",
        Severity::Error,
        "dmarc_invalid",
        format!(
            "The DMARC record at {name} {}, so receivers ignore it for mail from {domain}, or apply p=none when it has a \
             valid rua= address (RFC 7489 section 6.6.3).",
            error.describe()
        ),
        Some(fix),
    )
}

fn dmarc_policy_none(domain: &str, name: &str, tag: &str, has_rua: bool) -> Finding {
    let reports = if has_rua { String::new() } else { format!("Add rua=mailto:<address> at {name} to receive aggregate reports. ") };
    Finding::new(
        "DMARC",
        Severity::Warning,
        "dmarc_policy_none",
        format!("The DMARC policy for {domain} is {tag}=none, which only monitors, so receivers still deliver mail that fails DMARC."),
        Some(format!(
            "{reports}Once the reports show that all mail from {domain} passes DMARC, change {tag}=none to {tag}=quarantine at {name}."
        )),
    )
}

fn dmarc_aligned(domain: &str, name: &str, inherited_from: Option<&str>, tag: &str, policy: Policy, record: &DmarcRecord) -> Finding {
    let source = match inherited_from {
        Some(organizational) => format!("inherited from the organizational domain {organizational} ({name})"),
        None => format!("from {name}"),
    };
    Finding::new(
        "DMARC",
        Severity::Ok,
        "dmarc_aligned",
        format!(
            "The DMARC policy for {domain} is {tag}={}, {source}, with adkim={} and aspf={}. Mail from this service aligns \
             in both strict and relaxed mode, because its DKIM signature has d={domain}, the From domain, and its MAIL FROM \
             domain, which SPF checks, is {domain}. So DMARC passes whenever SPF or DKIM passes.",
            policy.name(),
            record.dkim_alignment,
            record.spf_alignment
        ),
        None,
    )
}

fn dmarc_unavailable(domain: &str, name: &str, reason: &str) -> Finding {
    Finding::new(
        "DMARC",
        Severity::Warning,
        "dmarc_unavailable",
        format!("The TXT lookup of {name} failed ({reason}), so this check cannot tell which DMARC policy receivers apply to {domain}."),
        Some(format!("Run the check again later. If it keeps failing, check that the name servers for {name} answer TXT queries.")),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dns::fixed::FixedTxt;

    const PLATFORM: &str = "_spf.outbound.example";
    const DOMAIN: &str = "mail.tenant.example";

    /// Returns a zone with the platform's include published, as in production.
    fn zone() -> FixedTxt {
        FixedTxt::default().with(PLATFORM, &["v=spf1 ip4:198.51.100.0/24 -all"])
    }

    fn codes(findings: &[Finding]) -> Vec<&'static str> {
        findings.iter().map(|finding| finding.code).collect()
    }

    fn only<'a>(findings: &'a [Finding], code: &str) -> &'a Finding {
        let matching: Vec<&Finding> = findings.iter().filter(|finding| finding.code == code).collect();
        assert_eq!(matching.len(), 1, "expected one {code} finding in {findings:#?}");
        matching[0]
    }

    fn fix_of(finding: &Finding) -> &str {
        finding.fix.as_deref().unwrap_or_default()
    }

    fn with_answer(fixed: FixedTxt, name: &str, answer: TxtAnswer) -> FixedTxt {
        let mut fixed = fixed;
        fixed.answers.insert(name.to_string(), answer);
        fixed
    }

    /// Adds a chain of `length` records, `chain0.tenant.example` to `chain<length-1>`, each
    /// including the next.
    fn include_chain(fixed: FixedTxt, length: usize) -> FixedTxt {
        let mut fixed = fixed;
        for index in 0..length {
            let record = if index + 1 < length {
                format!("v=spf1 include:chain{}.tenant.example ~all", index + 1)
            } else {
                "v=spf1 ip4:192.0.2.0/24 ~all".to_string()
            };
            fixed = fixed.with(&format!("chain{index}.tenant.example"), &[&record]);
        }
        fixed
    }

    // SPF parsing

    #[test]
    fn spf_version_detection() {
        assert!(is_spf_record("v=spf1"));
        assert!(is_spf_record("V=SPF1 -all"));
        assert!(!is_spf_record("v=spf10 -all"));
        assert!(!is_spf_record("google-site-verification=abc"));
        assert!(!is_spf_record("v=spf"));
    }

    #[test]
    fn spf_term_kinds() {
        let terms =
            parse_spf("v=spf1 -include:Other.Example. a mx:mx.example/24 ip4:192.0.2.1 exp=explain.example redirect=r.example ?all")
                .unwrap_or_default();
        let kinds: Vec<TermKind> = terms.into_iter().map(|term| term.kind).collect();
        assert_eq!(
            kinds,
            vec![
                TermKind::Include { qualifier: Qualifier::Fail, domain: "other.example".to_string() },
                TermKind::Lookup,
                TermKind::Lookup,
                TermKind::Address,
                TermKind::Other,
                TermKind::Redirect("r.example".to_string()),
                TermKind::All(Qualifier::Neutral),
            ]
        );
    }

    #[test]
    fn spf_suggested_record_moves_include() {
        let terms = parse_spf("v=spf1 mx -all include:_spf.outbound.example").unwrap_or_default();
        assert_eq!(record_with_include(&terms, PLATFORM), "v=spf1 mx include:_spf.outbound.example -all");
    }

    // SPF checks

    #[tokio::test]
    async fn spf_missing_without_record() {
        let dns = zone().with(DOMAIN, &["google-site-verification=abc"]);
        let findings = check_spf(DOMAIN, PLATFORM, &dns).await;
        assert_eq!(codes(&findings), vec!["spf_missing"]);
        assert_eq!(findings[0].severity, Severity::Error);
        assert!(fix_of(&findings[0]).contains("v=spf1 include:_spf.outbound.example ~all"), "{findings:#?}");
    }

    #[tokio::test]
    async fn spf_multiple_records_merged() {
        let dns = zone().with(DOMAIN, &["v=spf1 include:_spf.google.com ~all", "v=spf1 mx include:_spf.google.com -all"]);
        let findings = check_spf(DOMAIN, PLATFORM, &dns).await;
        assert_eq!(codes(&findings), vec!["spf_multiple"]);
        assert_eq!(findings[0].severity, Severity::Error);
        assert!(findings[0].finding.contains("permerror"), "{findings:#?}");
        assert!(fix_of(&findings[0]).contains("v=spf1 include:_spf.google.com mx include:_spf.outbound.example ~all"), "{findings:#?}");
    }

    #[tokio::test]
    async fn spf_include_missing_softfail() {
        let dns = zone().with(DOMAIN, &["v=spf1 ip4:192.0.2.0/24 ~all"]);
        let findings = check_spf(DOMAIN, PLATFORM, &dns).await;
        assert_eq!(codes(&findings), vec!["spf_include_missing"]);
        let finding = only(&findings, "spf_include_missing");
        assert_eq!(finding.severity, Severity::Error);
        assert!(finding.finding.contains("`~all` term: softfail"), "{finding:#?}");
        assert!(fix_of(finding).contains("v=spf1 ip4:192.0.2.0/24 include:_spf.outbound.example ~all"), "{finding:#?}");
    }

    #[tokio::test]
    async fn spf_include_missing_fail_and_neutral() {
        let dns = zone().with(DOMAIN, &["v=spf1 mx -all"]).with("other.tenant.example", &["v=spf1 mx"]);
        let fail = check_spf(DOMAIN, PLATFORM, &dns).await;
        assert!(only(&fail, "spf_include_missing").finding.contains("`-all` term: fail"), "{fail:#?}");

        let neutral = check_spf("other.tenant.example", PLATFORM, &dns).await;
        assert!(only(&neutral, "spf_include_missing").finding.contains("result neutral"), "{neutral:#?}");
    }

    #[tokio::test]
    async fn spf_include_after_all_is_missing() {
        let dns = zone().with(DOMAIN, &["v=spf1 -all include:_spf.outbound.example"]);
        let findings = check_spf(DOMAIN, PLATFORM, &dns).await;
        let finding = only(&findings, "spf_include_missing");
        assert_eq!(finding.severity, Severity::Error);
        assert!(fix_of(finding).ends_with("v=spf1 include:_spf.outbound.example -all"), "{finding:#?}");
    }

    #[tokio::test]
    async fn spf_include_with_fail_qualifier_is_missing() {
        let dns = zone().with(DOMAIN, &["v=spf1 -include:_spf.outbound.example ~all"]);
        let findings = check_spf(DOMAIN, PLATFORM, &dns).await;
        assert_eq!(codes(&findings), vec!["spf_include_missing"]);
    }

    #[tokio::test]
    async fn spf_nested_include_reaches_platform() {
        let dns = zone()
            .with(DOMAIN, &["v=spf1 include:spf.tenant.example -all"])
            .with("spf.tenant.example", &["v=spf1 ip4:192.0.2.0/24 include:_SPF.outbound.example. ~all"])
            .with(PLATFORM, &["v=spf1 ip4:198.51.100.0/24 -all"]);
        let findings = check_spf(DOMAIN, PLATFORM, &dns).await;
        assert_eq!(codes(&findings), vec!["spf_ok"]);
        assert_eq!(findings[0].severity, Severity::Ok);
        assert!(findings[0].finding.contains("needs 2 of the 10"), "{findings:#?}");
    }

    #[tokio::test]
    async fn spf_redirect_reaches_platform() {
        let dns = zone().with(DOMAIN, &["v=spf1 redirect=_spf.outbound.example"]);
        let findings = check_spf(DOMAIN, PLATFORM, &dns).await;
        assert_eq!(codes(&findings), vec!["spf_ok"]);
        assert!(findings[0].finding.contains("needs 1 of the 10"), "{findings:#?}");
    }

    #[tokio::test]
    async fn spf_redirect_ignored_after_all() {
        let dns = zone().with(DOMAIN, &["v=spf1 redirect=_spf.outbound.example ~all"]);
        let findings = check_spf(DOMAIN, PLATFORM, &dns).await;
        assert_eq!(codes(&findings), vec!["spf_include_missing"]);
    }

    #[tokio::test]
    async fn spf_platform_without_record_is_void() {
        let dns = FixedTxt::default().with(DOMAIN, &["v=spf1 a mx include:_spf.outbound.example ~all"]);
        let findings = check_spf(DOMAIN, PLATFORM, &dns).await;
        assert_eq!(codes(&findings), vec!["spf_include_void"]);
        assert_eq!(findings[0].severity, Severity::Error);
        assert!(fix_of(&findings[0]).contains("domains.spf_include"), "{findings:#?}");
    }

    #[tokio::test]
    async fn spf_void_include_before_platform_fails() {
        let dns = zone().with(DOMAIN, &["v=spf1 include:typo.tenant.example include:_spf.outbound.example -all"]);
        let findings = check_spf(DOMAIN, PLATFORM, &dns).await;
        let void = only(&findings, "spf_include_void");
        assert_eq!(void.severity, Severity::Error);
        assert!(void.finding.contains("typo.tenant.example"), "{void:#?}");
        assert!(!codes(&findings).contains(&"spf_ok"), "{findings:#?}");
    }

    #[tokio::test]
    async fn spf_void_include_after_platform_warns() {
        let dns = zone().with(DOMAIN, &["v=spf1 include:_spf.outbound.example include:typo.tenant.example -all"]);
        let findings = check_spf(DOMAIN, PLATFORM, &dns).await;
        assert_eq!(only(&findings, "spf_include_void").severity, Severity::Warning);
        assert_eq!(only(&findings, "spf_ok").severity, Severity::Ok);
    }

    #[tokio::test]
    async fn spf_too_many_lookups_after_platform_warns() {
        let includes: String = (0..11).map(|index| format!(" include:chain{index}.tenant.example")).collect();
        let mut dns = zone().with(DOMAIN, &[&format!("v=spf1 include:_spf.outbound.example{includes} -all")]);
        for index in 0..11 {
            dns = dns.with(&format!("chain{index}.tenant.example"), &["v=spf1 ip4:192.0.2.1 -all"]);
        }
        let findings = check_spf(DOMAIN, PLATFORM, &dns).await;
        let too_many = only(&findings, "spf_too_many_lookups");
        assert_eq!(too_many.severity, Severity::Warning);
        assert!(too_many.finding.contains("after 1 lookups"), "{too_many:#?}");
    }

    #[tokio::test]
    async fn spf_split_record_joined() {
        // Two character-strings of one TXT record, which the resolver joins without a space.
        let joined = concat!("v=spf1 ip4:192.0.2.0/24 include:_spf.out", "bound.example ~all");
        let dns = zone().with(DOMAIN, &[joined]);
        let findings = check_spf(DOMAIN, PLATFORM, &dns).await;
        assert_eq!(codes(&findings), vec!["spf_ok"]);
        assert!(findings[0].finding.contains("needs 1 of the 10"), "{findings:#?}");
    }

    #[tokio::test]
    async fn spf_include_chain_of_eleven() {
        let dns = include_chain(zone(), 10)
            .with(DOMAIN, &["v=spf1 include:chain0.tenant.example include:_spf.outbound.example ~all"]);
        let findings = check_spf(DOMAIN, PLATFORM, &dns).await;
        assert_eq!(codes(&findings), vec!["spf_too_many_lookups"]);
        let finding = only(&findings, "spf_too_many_lookups");
        assert_eq!(finding.severity, Severity::Error);
        assert!(finding.finding.contains("needs 11 DNS lookups"), "{finding:#?}");
        assert!(finding.finding.contains("include:chain0.tenant.example 10"), "{finding:#?}");
        assert!(fix_of(finding).contains("Remove the includes"), "{finding:#?}");
    }

    #[tokio::test]
    async fn spf_include_chain_of_ten_ok() {
        let dns = include_chain(zone(), 9)
            .with(DOMAIN, &["v=spf1 include:_spf.outbound.example include:chain0.tenant.example ~all"]);
        let findings = check_spf(DOMAIN, PLATFORM, &dns).await;
        assert_eq!(codes(&findings), vec!["spf_ok"]);
        assert!(findings[0].finding.contains("needs 10 of the 10"), "{findings:#?}");
    }

    #[tokio::test]
    async fn spf_deep_chain_stops() {
        let dns = include_chain(zone(), 60)
            .with(DOMAIN, &["v=spf1 include:_spf.outbound.example include:chain0.tenant.example ~all"]);
        let findings = check_spf(DOMAIN, PLATFORM, &dns).await;
        let finding = only(&findings, "spf_too_many_lookups");
        assert!(finding.finding.contains("at least 13 DNS lookups"), "{finding:#?}");
    }

    #[tokio::test]
    async fn spf_include_loop_terminates() {
        let dns = zone()
            .with(DOMAIN, &["v=spf1 include:_spf.outbound.example include:a.tenant.example ~all"])
            .with("a.tenant.example", &["v=spf1 include:b.tenant.example ~all"])
            .with("b.tenant.example", &["v=spf1 include:a.tenant.example ~all"]);
        let findings = check_spf(DOMAIN, PLATFORM, &dns).await;
        assert_eq!(codes(&findings), vec!["spf_too_many_lookups"]);
        let finding = only(&findings, "spf_too_many_lookups");
        assert_eq!(finding.severity, Severity::Error);
        assert!(finding.finding.contains("a.tenant.example -> b.tenant.example -> a.tenant.example"), "{finding:#?}");
        assert!(fix_of(finding).contains("of a.tenant.example from the SPF record at b.tenant.example"), "{finding:#?}");
    }

    #[tokio::test]
    async fn spf_self_include_terminates() {
        let dns = zone().with(DOMAIN, &["v=spf1 include:mail.tenant.example ~all"]);
        let findings = check_spf(DOMAIN, PLATFORM, &dns).await;
        assert_eq!(codes(&findings), vec!["spf_include_missing", "spf_too_many_lookups"]);
    }

    #[tokio::test]
    async fn spf_errors_listed_together() {
        let dns = include_chain(zone(), 11).with(DOMAIN, &["v=spf1 include:chain0.tenant.example +all"]);
        let findings = check_spf(DOMAIN, PLATFORM, &dns).await;
        assert_eq!(codes(&findings), vec!["spf_include_missing", "spf_too_many_lookups", "spf_all_pass"]);
        assert_eq!(findings[0].severity, Severity::Error);
        assert_eq!(findings[1].severity, Severity::Error);
        assert_eq!(findings[2].severity, Severity::Warning);
    }

    #[tokio::test]
    async fn spf_all_pass_warning() {
        let dns = zone().with(DOMAIN, &["v=spf1 include:_spf.outbound.example all"]);
        let findings = check_spf(DOMAIN, PLATFORM, &dns).await;
        assert_eq!(codes(&findings), vec!["spf_all_pass", "spf_ok"]);
        let finding = only(&findings, "spf_all_pass");
        assert_eq!(finding.severity, Severity::Warning);
        assert!(finding.finding.contains("ends with `all`"), "{finding:#?}");
        assert!(fix_of(finding).contains("Replace `all` with `~all`"), "{finding:#?}");
    }

    #[tokio::test]
    async fn spf_all_pass_in_include() {
        let dns = zone()
            .with(DOMAIN, &["v=spf1 include:_spf.outbound.example include:lax.example -all"])
            .with("lax.example", &["v=spf1 +all"]);
        let findings = check_spf(DOMAIN, PLATFORM, &dns).await;
        let finding = only(&findings, "spf_all_pass");
        assert!(finding.finding.contains("The SPF record at lax.example, which mail.tenant.example includes,"), "{finding:#?}");
    }

    #[tokio::test]
    async fn spf_unavailable_at_domain() {
        let dns = with_answer(zone(), DOMAIN, TxtAnswer::Unavailable("SERVFAIL".to_string()));
        let findings = check_spf(DOMAIN, PLATFORM, &dns).await;
        assert_eq!(codes(&findings), vec!["spf_unavailable"]);
        assert_eq!(findings[0].severity, Severity::Warning);
        assert!(findings[0].finding.contains("failed for mail.tenant.example (SERVFAIL)"), "{findings:#?}");
    }

    #[tokio::test]
    async fn spf_unavailable_nested_include() {
        let dns = with_answer(
            zone().with(DOMAIN, &["v=spf1 include:slow.example ~all"]),
            "slow.example",
            TxtAnswer::Unavailable("timed out".to_string()),
        );
        let findings = check_spf(DOMAIN, PLATFORM, &dns).await;
        // The platform include may be in the record whose lookup failed.
        assert_eq!(codes(&findings), vec!["spf_unavailable"]);
        assert!(findings[0].finding.contains("failed for slow.example (timed out)"), "{findings:#?}");
    }

    // DMARC parsing

    #[test]
    fn dmarc_version_detection() {
        assert!(is_dmarc_record("v=DMARC1; p=none"));
        assert!(is_dmarc_record("V = DMARC1;p=none"));
        assert!(!is_dmarc_record("v=dmarc1; p=none"));
        assert!(!is_dmarc_record("p=none; v=DMARC1"));
    }

    #[test]
    fn dmarc_tag_parsing() {
        let tags = parse_tags(" v=DMARC1 ;P = Reject; rua=mailto:d@example.com;").unwrap_or_default();
        assert_eq!(tags.get("p").map(String::as_str), Some("Reject"));
        assert_eq!(tags.get("rua").map(String::as_str), Some("mailto:d@example.com"));
        assert!(parse_tags("v=DMARC1; p=none; p=reject").is_err());
        assert!(parse_tags("v=DMARC1; reject").is_err());
        assert_eq!(
            parse_dmarc("v=DMARC1; p=Reject; adkim=S", false).map(|record| (record.policy, record.dkim_alignment)),
            Ok((Policy::Reject, 's'))
        );
    }

    // DMARC checks

    #[tokio::test]
    async fn dmarc_missing_without_record() {
        let dns = zone().with("_dmarc.mail.tenant.example", &["some-verification=1"]);
        let findings = check_dmarc(DOMAIN, &dns).await;
        assert_eq!(codes(&findings), vec!["dmarc_missing"]);
        assert_eq!(findings[0].severity, Severity::Warning);
        assert!(findings[0].finding.contains("_dmarc.tenant.example"), "{findings:#?}");
        assert!(fix_of(&findings[0]).contains("at _dmarc.mail.tenant.example: v=DMARC1; p=quarantine; adkim=r; aspf=r"), "{findings:#?}");
    }

    #[tokio::test]
    async fn dmarc_two_labels_skip_organizational() {
        let dns = zone();
        let findings = check_dmarc("tenant.example", &dns).await;
        assert_eq!(codes(&findings), vec!["dmarc_missing"]);
        assert!(findings[0].finding.starts_with("_dmarc.tenant.example has no DMARC record"), "{findings:#?}");
    }

    #[tokio::test]
    async fn dmarc_multiple_records() {
        let dns = zone().with("_dmarc.mail.tenant.example", &["v=DMARC1; p=none", "v=DMARC1; p=reject"]);
        let findings = check_dmarc(DOMAIN, &dns).await;
        assert_eq!(codes(&findings), vec!["dmarc_multiple"]);
        assert_eq!(findings[0].severity, Severity::Error);
        assert!(fix_of(&findings[0]).contains("_dmarc.mail.tenant.example"), "{findings:#?}");
    }

    #[tokio::test]
    async fn dmarc_invalid_policy() {
        let dns = zone().with("_dmarc.mail.tenant.example", &["v=DMARC1; p=block; rua=mailto:d@tenant.example"]);
        let findings = check_dmarc(DOMAIN, &dns).await;
        assert_eq!(codes(&findings), vec!["dmarc_invalid"]);
        assert_eq!(findings[0].severity, Severity::Error);
        assert!(findings[0].finding.contains("has p=block"), "{findings:#?}");
        assert!(fix_of(&findings[0]).contains("Set p=quarantine"), "{findings:#?}");
    }

    #[tokio::test]
    async fn dmarc_invalid_without_policy() {
        let dns = zone().with("_dmarc.mail.tenant.example", &["v=DMARC1; rua=mailto:d@tenant.example"]);
        let findings = check_dmarc(DOMAIN, &dns).await;
        assert_eq!(codes(&findings), vec!["dmarc_invalid"]);
        assert!(findings[0].finding.contains("has no p= tag"), "{findings:#?}");
    }

    #[tokio::test]
    async fn dmarc_invalid_tag_list() {
        let dns = zone().with("_dmarc.mail.tenant.example", &["v=DMARC1; p=reject; quarantine"]);
        let findings = check_dmarc(DOMAIN, &dns).await;
        assert_eq!(codes(&findings), vec!["dmarc_invalid"]);
        assert_eq!(findings[0].severity, Severity::Error);
        assert!(findings[0].finding.contains("`quarantine` is not a tag=value pair"), "{findings:#?}");
    }

    #[tokio::test]
    async fn dmarc_invalid_inherited_sp() {
        let dns = zone().with("_dmarc.tenant.example", &["v=DMARC1; p=reject; sp=quarantin"]);
        let findings = check_dmarc(DOMAIN, &dns).await;
        assert_eq!(codes(&findings), vec!["dmarc_invalid"]);
        assert!(findings[0].finding.contains("has sp=quarantin"), "{findings:#?}");
        assert!(
            fix_of(&findings[0]).contains("Set sp= to none, quarantine or reject in the record at _dmarc.tenant.example"),
            "{findings:#?}"
        );
    }

    #[tokio::test]
    async fn dmarc_own_record_ignores_sp() {
        let dns = zone().with("_dmarc.mail.tenant.example", &["v=DMARC1; p=reject; sp=quarantin"]);
        let findings = check_dmarc(DOMAIN, &dns).await;
        assert_eq!(codes(&findings), vec!["dmarc_aligned"]);
        assert!(findings[0].finding.contains("is p=reject"), "{findings:#?}");
    }

    #[tokio::test]
    async fn dmarc_policy_none_warning() {
        let dns = zone().with("_dmarc.mail.tenant.example", &["v=DMARC1; p=none"]);
        let findings = check_dmarc(DOMAIN, &dns).await;
        assert_eq!(codes(&findings), vec!["dmarc_policy_none", "dmarc_aligned"]);
        let finding = only(&findings, "dmarc_policy_none");
        assert_eq!(finding.severity, Severity::Warning);
        assert!(fix_of(finding).contains("Add rua=mailto:"), "{finding:#?}");
        assert!(fix_of(finding).contains("change p=none to p=quarantine at _dmarc.mail.tenant.example"), "{finding:#?}");
    }

    #[tokio::test]
    async fn dmarc_aligned_strict() {
        let dns = zone().with("_dmarc.mail.tenant.example", &["v=DMARC1; p=reject; adkim=s; rua=mailto:d@tenant.example"]);
        let findings = check_dmarc(DOMAIN, &dns).await;
        assert_eq!(codes(&findings), vec!["dmarc_aligned"]);
        let finding = only(&findings, "dmarc_aligned");
        assert_eq!(finding.severity, Severity::Ok);
        assert!(finding.finding.contains("p=reject, from _dmarc.mail.tenant.example, with adkim=s and aspf=r"), "{finding:#?}");
        assert!(finding.finding.contains("d=mail.tenant.example"), "{finding:#?}");
        assert!(finding.fix.is_none());
    }

    #[tokio::test]
    async fn dmarc_inherited_uses_sp() {
        let dns = zone().with("_dmarc.tenant.example", &["v=DMARC1; p=reject; sp=none; rua=mailto:d@tenant.example"]);
        let findings = check_dmarc(DOMAIN, &dns).await;
        assert_eq!(codes(&findings), vec!["dmarc_policy_none", "dmarc_aligned"]);
        let aligned = only(&findings, "dmarc_aligned");
        assert!(aligned.finding.contains("sp=none, inherited from the organizational domain tenant.example"), "{aligned:#?}");
        let none = only(&findings, "dmarc_policy_none");
        assert!(fix_of(none).starts_with("Once the reports"), "{none:#?}");
        assert!(fix_of(none).contains("change sp=none to sp=quarantine at _dmarc.tenant.example"), "{none:#?}");
    }

    #[tokio::test]
    async fn dmarc_inherited_falls_back_to_p() {
        let dns = zone().with("_dmarc.tenant.example", &["v=DMARC1; p=quarantine"]);
        let findings = check_dmarc(DOMAIN, &dns).await;
        assert_eq!(codes(&findings), vec!["dmarc_aligned"]);
        assert!(findings[0].finding.contains("p=quarantine, inherited from the organizational domain tenant.example"), "{findings:#?}");
    }

    #[tokio::test]
    async fn dmarc_unavailable_at_domain() {
        let dns = with_answer(zone(), "_dmarc.mail.tenant.example", TxtAnswer::Unavailable("REFUSED".to_string()));
        let findings = check_dmarc(DOMAIN, &dns).await;
        assert_eq!(codes(&findings), vec!["dmarc_unavailable"]);
        assert_eq!(findings[0].severity, Severity::Warning);
        assert!(findings[0].finding.contains("_dmarc.mail.tenant.example failed (REFUSED)"), "{findings:#?}");
    }

    #[tokio::test]
    async fn dmarc_unavailable_at_organizational() {
        let dns = with_answer(zone(), "_dmarc.tenant.example", TxtAnswer::Unavailable("timed out".to_string()));
        let findings = check_dmarc(DOMAIN, &dns).await;
        assert_eq!(codes(&findings), vec!["dmarc_unavailable"]);
        assert!(findings[0].finding.contains("_dmarc.tenant.example"), "{findings:#?}");
    }
}
