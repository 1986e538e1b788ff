//! DKIM keys: generation, encryption at rest, DNS records and signing.

use aws_lc_rs::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use aws_lc_rs::encoding::AsDer;
use aws_lc_rs::rand::{SecureRandom, SystemRandom};
use aws_lc_rs::rsa::{KeyPair, KeySize};
use aws_lc_rs::signature::KeyPair as _;
use base64::Engine as _;
use aws_lc_rs::signature::Ed25519KeyPair;
use mail_auth::common::crypto::{Ed25519Key, RsaKey, Sha256};
use mail_auth::common::headers::HeaderWriter;
use mail_auth::dkim::{Canonicalization, DkimSigner};
use rustls_pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};

use crate::configuration::KeyEncryptionKey;

/// Header fields covered by the signature, when present in the message.
pub const SIGNED_HEADERS: &[&str] = &[
    "From",
    "Reply-To",
    "To",
    "Cc",
    "Subject",
    "Date",
    "Message-ID",
    "In-Reply-To",
    "References",
    "Auto-Submitted",
    "MIME-Version",
    "Content-Type",
    "Content-Transfer-Encoding",
];

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("generating an RSA-2048 key failed")]
    Generate,
    #[error("decrypting the DKIM key failed: OUTBOUND_KEY_ENCRYPTION_KEY is not the key it was encrypted with, or the stored key is damaged")]
    Decrypt,
    #[error("the stored DKIM key is not a valid RSA key: {0}")]
    InvalidKey(String),
    #[error("DKIM signing failed: {0}")]
    Sign(String),
}

/// A DKIM key algorithm: RSA-2048 always, Ed25519 (RFC 8463) beside it when dual signing
/// is on for the domain.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Algorithm {
    Rsa,
    Ed25519,
}

impl Algorithm {
    pub fn as_str(self) -> &'static str {
        match self {
            Algorithm::Rsa => "rsa",
            Algorithm::Ed25519 => "ed25519",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "rsa" => Some(Algorithm::Rsa),
            "ed25519" => Some(Algorithm::Ed25519),
            _ => None,
        }
    }
}

/// A new key pair: the private key as PKCS#8 DER and the public key as it goes into the
/// DKIM record's `p=` tag (base64 SubjectPublicKeyInfo for RSA, base64 of the raw 32-byte
/// key for Ed25519).
pub struct GeneratedKey {
    pub private_pkcs8: Vec<u8>,
    pub public_base64: String,
}

pub fn generate_key(algorithm: Algorithm) -> Result<GeneratedKey, KeyError> {
    let engine = base64::engine::general_purpose::STANDARD;
    match algorithm {
        Algorithm::Rsa => {
            let pair = KeyPair::generate(KeySize::Rsa2048).map_err(|_| KeyError::Generate)?;
            let private: aws_lc_rs::encoding::Pkcs8V1Der = pair.as_der().map_err(|_| KeyError::Generate)?;
            let public: aws_lc_rs::encoding::PublicKeyX509Der = pair.public_key().as_der().map_err(|_| KeyError::Generate)?;
            Ok(GeneratedKey { private_pkcs8: private.as_ref().to_vec(), public_base64: engine.encode(public.as_ref()) })
        }
        Algorithm::Ed25519 => {
            let private = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new()).map_err(|_| KeyError::Generate)?;
            let pair = Ed25519KeyPair::from_pkcs8(private.as_ref()).map_err(|_| KeyError::Generate)?;
            Ok(GeneratedKey { private_pkcs8: private.as_ref().to_vec(), public_base64: engine.encode(pair.public_key().as_ref()) })
        }
    }
}

/// Encrypts a private key with AES-256-GCM; the domain is bound in as associated data, so a
/// key copied to another domain's row fails to decrypt. Output: nonce, then ciphertext and tag.
pub fn encrypt_private_key(kek: &KeyEncryptionKey, domain: &str, plaintext: &[u8]) -> Vec<u8> {
    let key = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &kek.0).expect("32-byte AES key"));
    let mut nonce_bytes = [0u8; NONCE_LEN];
    SystemRandom::new().fill(&mut nonce_bytes).expect("system randomness");
    let mut sealed = plaintext.to_vec();
    key.seal_in_place_append_tag(Nonce::assume_unique_for_key(nonce_bytes), Aad::from(domain.as_bytes()), &mut sealed)
        .expect("AES-GCM sealing of a small buffer");
    let mut out = nonce_bytes.to_vec();
    out.extend_from_slice(&sealed);
    out
}

pub fn decrypt_private_key(kek: &KeyEncryptionKey, domain: &str, stored: &[u8]) -> Result<Vec<u8>, KeyError> {
    if stored.len() <= NONCE_LEN {
        return Err(KeyError::Decrypt);
    }
    let key = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &kek.0).expect("32-byte AES key"));
    let (nonce, sealed) = stored.split_at(NONCE_LEN);
    let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| KeyError::Decrypt)?;
    let mut buffer = sealed.to_vec();
    let plaintext = key
        .open_in_place(nonce, Aad::from(domain.as_bytes()), &mut buffer)
        .map_err(|_| KeyError::Decrypt)?;
    Ok(plaintext.to_vec())
}

/// Returns the DKIM TXT record's text, as a receiver reads it once the strings are joined.
fn dkim_record_text(algorithm: Algorithm, public_base64: &str) -> String {
    format!("v=DKIM1; k={}; p={public_base64}", algorithm.as_str())
}

/// Formats the DKIM TXT record's text as quoted strings of at most 255 octets.
pub fn dkim_record_value(algorithm: Algorithm, public_base64: &str) -> String {
    dkim_record_text(algorithm, public_base64)
        .as_bytes()
        .chunks(255)
        .map(|chunk| format!("\"{}\"", String::from_utf8_lossy(chunk)))
        .collect::<Vec<_>>()
        .join(" ")
}

/// One key the signer uses: its selector, algorithm and decrypted PKCS#8 DER.
pub struct SigningKey<'a> {
    pub selector: &'a str,
    pub algorithm: Algorithm,
    pub private_pkcs8: &'a [u8],
}

enum KeySigner {
    Rsa(DkimSigner<RsaKey<Sha256>, mail_auth::dkim::Done>),
    Ed25519(DkimSigner<Ed25519Key, mail_auth::dkim::Done>),
}

/// Signs messages for one domain with each of its active keys, relaxed/relaxed: one
/// `DKIM-Signature` field per key.
pub struct Signer {
    signers: Vec<KeySigner>,
}

impl Signer {
    pub fn new(domain: &str, keys: &[SigningKey<'_>]) -> Result<Self, KeyError> {
        let mut signers = Vec::with_capacity(keys.len());
        for key in keys {
            let signer = match key.algorithm {
                Algorithm::Rsa => {
                    let der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.private_pkcs8.to_vec()));
                    let rsa = RsaKey::<Sha256>::from_key_der(der).map_err(|err| KeyError::InvalidKey(err.to_string()))?;
                    KeySigner::Rsa(configure(DkimSigner::from_key(rsa), domain, key.selector))
                }
                Algorithm::Ed25519 => {
                    let ed = Ed25519Key::from_pkcs8_der(key.private_pkcs8).map_err(|err| KeyError::InvalidKey(err.to_string()))?;
                    KeySigner::Ed25519(configure(DkimSigner::from_key(ed), domain, key.selector))
                }
            };
            signers.push(signer);
        }
        if signers.is_empty() {
            return Err(KeyError::InvalidKey("the domain has no active DKIM key".into()));
        }
        Ok(Signer { signers })
    }

    /// Returns the message with one `DKIM-Signature` field per key prepended.
    pub fn sign(&self, message: &[u8]) -> Result<Vec<u8>, KeyError> {
        let mut signed = Vec::with_capacity(message.len() + 1024 * self.signers.len());
        for signer in &self.signers {
            let signature = match signer {
                KeySigner::Rsa(signer) => signer.sign(message),
                KeySigner::Ed25519(signer) => signer.sign(message),
            }
            .map_err(|err| KeyError::Sign(err.to_string()))?;
            signed.extend_from_slice(signature.to_header().as_bytes());
        }
        signed.extend_from_slice(message);
        Ok(signed)
    }
}

fn configure<T: mail_auth::common::crypto::SigningKey>(
    signer: DkimSigner<T, mail_auth::dkim::NeedDomain>,
    domain: &str,
    selector: &str,
) -> DkimSigner<T, mail_auth::dkim::Done> {
    signer
        .domain(domain)
        .selector(selector)
        .headers(SIGNED_HEADERS.iter().copied())
        .header_canonicalization(Canonicalization::Relaxed)
        .body_canonicalization(Canonicalization::Relaxed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encryption_round_trip_binds_domain() {
        let kek = KeyEncryptionKey([7; 32]);
        let sealed = encrypt_private_key(&kek, "a.example", b"secret key bytes");
        assert_ne!(&sealed[NONCE_LEN..], b"secret key bytes");
        assert_eq!(decrypt_private_key(&kek, "a.example", &sealed).unwrap(), b"secret key bytes");
        assert!(decrypt_private_key(&kek, "b.example", &sealed).is_err());
        assert!(decrypt_private_key(&KeyEncryptionKey([8; 32]), "a.example", &sealed).is_err());
    }

    #[test]
    fn record_split_into_255_octet_strings() {
        let key = generate_key(Algorithm::Rsa).unwrap();
        let value = dkim_record_value(Algorithm::Rsa, &key.public_base64);
        let strings: Vec<&str> = value.split("\" \"").collect();
        assert!(strings.len() >= 2, "an RSA-2048 record needs two strings");
        for piece in &strings {
            assert!(piece.trim_matches('"').len() <= 255);
        }
        let joined: String = strings.iter().map(|s| s.trim_matches('"')).collect();
        assert_eq!(joined, format!("v=DKIM1; k=rsa; p={}", key.public_base64));
    }
}
