//! Email addresses (RFC 5321 addr-spec) with internationalized domains.

use std::fmt;

/// An addr-spec whose domain is kept in its ASCII (IDNA) form, which every relay and
/// receiver accepts. A non-ASCII local part is kept as UTF-8 and needs SMTPUTF8.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Address {
    local: String,
    domain: String,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AddressError {
    #[error("it has no @ between a local part and a domain")]
    MissingAt,
    #[error("the local part is empty, longer than 64 octets, or has characters outside an unquoted or quoted local part")]
    InvalidLocalPart,
    #[error("the domain is not a valid host name (or IDNA name) with at least two labels")]
    InvalidDomain,
}

impl Address {
    pub fn parse(text: &str) -> Result<Self, AddressError> {
        let (local, domain) = text.rsplit_once('@').ok_or(AddressError::MissingAt)?;
        if !valid_local_part(local) {
            return Err(AddressError::InvalidLocalPart);
        }
        let domain = ascii_domain(domain).ok_or(AddressError::InvalidDomain)?;
        Ok(Address { local: local.to_string(), domain })
    }

    pub fn local_part(&self) -> &str {
        &self.local
    }

    /// Returns the domain in lower-case ASCII, with IDNA labels as `xn--`.
    pub fn domain(&self) -> &str {
        &self.domain
    }

    pub fn needs_smtputf8(&self) -> bool {
        !self.local.is_ascii()
    }
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.local, self.domain)
    }
}

fn valid_local_part(local: &str) -> bool {
    if local.is_empty() || local.len() > 64 {
        return false;
    }
    if local.len() >= 2 && local.starts_with('"') && local.ends_with('"') {
        let inner = &local[1..local.len() - 1];
        let mut escaped = false;
        for c in inner.chars() {
            if c.is_control() {
                return false;
            }
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                return false;
            }
        }
        return !escaped;
    }
    // dot-atom: atext separated by single dots, with UTF-8 allowed as in RFC 6531.
    let atext = |c: char| c.is_ascii_alphanumeric() || "!#$%&'*+-/=?^_`{|}~".contains(c) || (!c.is_ascii() && !c.is_control() && !c.is_whitespace());
    local.split('.').all(|atom| !atom.is_empty() && atom.chars().all(atext))
}

/// Converts a domain to lower-case ASCII through IDNA, or `None` when it is not a host name.
pub fn ascii_domain(domain: &str) -> Option<String> {
    if domain.starts_with('[') && domain.ends_with(']') {
        let literal = &domain[1..domain.len() - 1];
        return literal.parse::<std::net::Ipv4Addr>().ok().map(|_| domain.to_string());
    }
    let ascii = idna::domain_to_ascii(domain).ok()?;
    let labels: Vec<&str> = ascii.split('.').collect();
    let valid = ascii.len() <= 253
        && labels.len() >= 2
        && labels.iter().all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        });
    valid.then_some(ascii)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idn_domain_becomes_punycode() {
        let address = Address::parse("user@exämple.org").unwrap();
        assert_eq!(address.to_string(), "user@xn--exmple-cua.org");
        assert!(!address.needs_smtputf8());
    }

    #[test]
    fn utf8_local_part_needs_smtputf8() {
        let address = Address::parse("rené@example.org").unwrap();
        assert!(address.needs_smtputf8());
    }

    #[test]
    fn domain_is_lowercased() {
        assert_eq!(Address::parse("A.B@Example.NET").unwrap().to_string(), "A.B@example.net");
    }

    #[test]
    fn malformed_addresses_rejected() {
        for bad in ["plain", "@example.org", "a@", "a..b@example.org", "a b@example.org", "a@localhost", "a@-x.example", "a@exa mple.org", "<a@b.example>"] {
            assert!(Address::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn quoted_local_part_accepted() {
        assert!(Address::parse("\"john doe\"@example.org").is_ok());
        assert!(Address::parse("\"bad\"quote\"@example.org").is_err());
    }
}
