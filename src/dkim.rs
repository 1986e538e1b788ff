//! DKIM keys: generation, encryption at rest, DNS records and signing.

use aws_lc_rs::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use aws_lc_rs::encoding::AsDer;
use aws_lc_rs::rand::{SecureRandom, SystemRandom};
use aws_lc_rs::rsa::{KeyPair, KeySize};
use aws_lc_rs::signature::KeyPair as _;
use base64::Engine as _;
use mail_auth::common::crypto::{RsaKey, Sha256};
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

/// A new RSA-2048 key pair: the private key as PKCS#8 DER and the public key as the
/// base64 SubjectPublicKeyInfo that goes into the DKIM record's `p=` tag.
pub struct GeneratedKey {
    pub private_pkcs8: Vec<u8>,
    pub public_base64: String,
}

pub fn generate_key() -> Result<GeneratedKey, KeyError> {
    let pair = KeyPair::generate(KeySize::Rsa2048).map_err(|_| KeyError::Generate)?;
    let private: aws_lc_rs::encoding::Pkcs8V1Der = pair.as_der().map_err(|_| KeyError::Generate)?;
    let public: aws_lc_rs::encoding::PublicKeyX509Der = pair.public_key().as_der().map_err(|_| KeyError::Generate)?;
    Ok(GeneratedKey {
        private_pkcs8: private.as_ref().to_vec(),
        public_base64: base64::engine::general_purpose::STANDARD.encode(public.as_ref()),
    })
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

/// Formats the DKIM TXT record's text as quoted strings of at most 255 octets.
pub fn dkim_record_value(public_base64: &str) -> String {
    let record = format!("v=DKIM1; k=rsa; p={public_base64}");
    record
        .as_bytes()
        .chunks(255)
        .map(|chunk| format!("\"{}\"", String::from_utf8_lossy(chunk)))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Signs messages for one domain and selector with RSA-SHA256, relaxed/relaxed.
pub struct Signer {
    signer: DkimSigner<RsaKey<Sha256>, mail_auth::dkim::Done>,
}

impl Signer {
    pub fn new(domain: &str, selector: &str, private_pkcs8: &[u8]) -> Result<Self, KeyError> {
        let key = RsaKey::<Sha256>::from_key_der(PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(private_pkcs8.to_vec())))
            .map_err(|err| KeyError::InvalidKey(err.to_string()))?;
        let signer = DkimSigner::from_key(key)
            .domain(domain)
            .selector(selector)
            .headers(SIGNED_HEADERS.iter().copied())
            .header_canonicalization(Canonicalization::Relaxed)
            .body_canonicalization(Canonicalization::Relaxed);
        Ok(Signer { signer })
    }

    /// Returns the message with its `DKIM-Signature` field prepended.
    pub fn sign(&self, message: &[u8]) -> Result<Vec<u8>, KeyError> {
        let signature = self.signer.sign(message).map_err(|err| KeyError::Sign(err.to_string()))?;
        let mut signed = signature.to_header().into_bytes();
        signed.extend_from_slice(message);
        Ok(signed)
    }
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
        let key = generate_key().unwrap();
        let value = dkim_record_value(&key.public_base64);
        let strings: Vec<&str> = value.split("\" \"").collect();
        assert!(strings.len() >= 2, "an RSA-2048 record needs two strings");
        for piece in &strings {
            assert!(piece.trim_matches('"').len() <= 255);
        }
        let joined: String = strings.iter().map(|s| s.trim_matches('"')).collect();
        assert_eq!(joined, format!("v=DKIM1; k=rsa; p={}", key.public_base64));
    }
}
