//! Checkpoints (C2SP `tlog-checkpoint`) in signed notes (C2SP `signed-note`), signed with Ed25519.
//!
//! A checkpoint's text is `<origin>\n<tree size>\n<base64 root>\n`; the signed note is that text, a blank
//! line, and one line per signature: `— <key name> <base64(key id || signature)>\n`, the signature over the
//! text. The key id is the first 4 bytes of SHA-256(`<key name>\n` || 0x01 || public key). Keys are written
//! the way Go's `golang.org/x/mod/sumdb/note` writes them, so Go and other tooling read them too:
//! - verifier key: `<name>+<key id, 8 hex digits>+<base64(0x01 || public key)>`;
//! - signing key: `PRIVATE+KEY+<name>+<key id>+<base64(0x01 || 32-byte seed)>` (a secret; never logged).

use std::fmt;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use ring::digest::{Context, SHA256};
use ring::rand::{SecureRandom, SystemRandom};
use ring::signature::{ED25519, Ed25519KeyPair, KeyPair, UnparsedPublicKey};

use super::merkle::Hash;
use chatvault_core::error::{Error, Result};

/// The signature algorithm byte of Ed25519 keys in signed notes.
const ED25519_TYPE: u8 = 0x01;
/// What starts every signature line (an em dash and a space).
const SIGNATURE_PREFIX: &str = "\u{2014} ";

/// A tree head: the log `origin`, its size and root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    pub origin: String,
    pub size: u64,
    pub root: Hash,
}

impl Checkpoint {
    /// The checkpoint's text, as signed.
    pub fn text(&self) -> String {
        format!(
            "{}\n{}\n{}\n",
            self.origin,
            self.size,
            BASE64.encode(self.root)
        )
    }

    /// Parses a checkpoint's text (extension lines after the root are allowed and ignored).
    pub fn parse(text: &str) -> Result<Checkpoint> {
        let bad = |why: &str| Error::invalid_argument(format!("not a checkpoint: {why}"));
        let mut lines = text.split('\n');
        let origin = lines.next().unwrap_or_default();
        let size = lines.next().ok_or_else(|| bad("no tree size line"))?;
        let root = lines.next().ok_or_else(|| bad("no root hash line"))?;
        if !text.ends_with('\n') {
            return Err(bad("the text does not end in a newline"));
        }
        check_origin(origin).map_err(|why| bad(&why))?;
        if size.is_empty()
            || !size.bytes().all(|b| b.is_ascii_digit())
            || size.starts_with("0") && size.len() > 1
        {
            return Err(bad(&format!("tree size {size:?} is not a decimal number")));
        }
        let size = size
            .parse()
            .map_err(|_| bad(&format!("tree size {size:?} is out of range")))?;
        let root: Hash = BASE64
            .decode(root)
            .ok()
            .and_then(|bytes| bytes.try_into().ok())
            .ok_or_else(|| bad("the root hash is not 32 bytes of base64"))?;
        Ok(Checkpoint {
            origin: origin.to_string(),
            size,
            root,
        })
    }
}

/// A log origin or key name: not empty, no whitespace, no `+`.
pub fn check_origin(origin: &str) -> std::result::Result<(), String> {
    if origin.is_empty() {
        return Err("the origin is empty".into());
    }
    if origin.chars().any(|c| c.is_whitespace() || c == '+') {
        return Err(format!(
            "origin {origin:?} contains a space, a newline or a '+'"
        ));
    }
    Ok(())
}

/// The 4-byte key id of an Ed25519 key named `name`.
fn key_id(name: &str, public_key: &[u8]) -> u32 {
    let mut context = Context::new(&SHA256);
    context.update(name.as_bytes());
    context.update(b"\n");
    context.update(&[ED25519_TYPE]);
    context.update(public_key);
    let digest = context.finish();
    u32::from_be_bytes(digest.as_ref()[..4].try_into().expect("4 bytes"))
}

/// An Ed25519 signing key for checkpoints. `Debug` shows only the name and key id.
pub struct SigningKey {
    name: String,
    id: u32,
    pair: Ed25519KeyPair,
}

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "SigningKey({}+{:08x}, secret redacted)",
            self.name, self.id
        )
    }
}

impl SigningKey {
    /// A new random key named `name` (the log's origin), and its text (`PRIVATE+KEY+...`) to store.
    pub fn generate(name: &str) -> Result<(SigningKey, String)> {
        check_origin(name).map_err(Error::invalid_argument)?;
        let mut seed = [0u8; 32];
        SystemRandom::new()
            .fill(&mut seed)
            .map_err(|_| Error::internal("the system random source failed"))?;
        let key = Self::from_seed(name, &seed)?;
        let text = format!(
            "PRIVATE+KEY+{name}+{:08x}+{}",
            key.id,
            BASE64.encode([&[ED25519_TYPE][..], &seed].concat())
        );
        seed.fill(0);
        Ok((key, text))
    }

    fn from_seed(name: &str, seed: &[u8]) -> Result<SigningKey> {
        let pair = Ed25519KeyPair::from_seed_unchecked(seed)
            .map_err(|_| Error::invalid_argument("not an Ed25519 private key"))?;
        let id = key_id(name, pair.public_key().as_ref());
        Ok(SigningKey {
            name: name.to_string(),
            id,
            pair,
        })
    }

    /// Reads the signing key file at `path` (a secret: errors name the file, never its contents).
    pub fn load(path: &std::path::Path) -> Result<SigningKey> {
        let text = zeroize::Zeroizing::new(std::fs::read_to_string(path).map_err(|error| {
            Error::invalid_argument(format!(
                "integrity.signing_key_path: cannot read {}: {error}",
                path.display()
            ))
        })?);
        SigningKey::parse(&text).map_err(|error| {
            Error::invalid_argument(format!(
                "integrity.signing_key_path: {}: {}",
                path.display(),
                error.message()
            ))
        })
    }

    /// Parses a signing key's text (`PRIVATE+KEY+<name>+<id>+<base64>`, surrounding whitespace ignored).
    /// Errors never quote the key.
    pub fn parse(text: &str) -> Result<SigningKey> {
        let bad =
            |why: &str| Error::invalid_argument(format!("not a checkpoint signing key: {why}"));
        let rest = text
            .trim()
            .strip_prefix("PRIVATE+KEY+")
            .ok_or_else(|| bad("it does not start with PRIVATE+KEY+"))?;
        // The base64 key may contain '+' itself: it is the rest after the name and id.
        let mut parts = rest.splitn(3, '+');
        let (Some(name), Some(id), Some(material)) = (parts.next(), parts.next(), parts.next())
        else {
            return Err(bad("expected PRIVATE+KEY+<name>+<key id>+<key>"));
        };
        let material = BASE64
            .decode(material)
            .map_err(|_| bad("the key is not base64"))?;
        if material.len() != 33 || material[0] != ED25519_TYPE {
            return Err(bad("only Ed25519 keys (type 0x01, 32 bytes) are supported"));
        }
        let key = Self::from_seed(name, &material[1..])?;
        if format!("{:08x}", key.id) != id {
            return Err(bad("its key id does not match its name and key"));
        }
        Ok(key)
    }
}

impl NoteSigner for SigningKey {
    fn name(&self) -> &str {
        &self.name
    }

    fn public_key(&self) -> &[u8] {
        self.pair.public_key().as_ref()
    }

    fn sign(&self, message: &[u8]) -> Result<Vec<u8>> {
        Ok(self.pair.sign(message).as_ref().to_vec())
    }
}

/// What signs checkpoints and drill reports: an Ed25519 key from a file ([`SigningKey`]) or on a PKCS#11 token
/// (`keys::pkcs11::HsmNoteSigner`), named like the log's origin. Signing may block (an HSM round trip): async
/// callers run it on the blocking pool.
pub trait NoteSigner: Send + Sync + fmt::Debug {
    /// The key's name: the log's origin.
    fn name(&self) -> &str;
    /// The raw 32-byte Ed25519 public key.
    fn public_key(&self) -> &[u8];
    /// The Ed25519 signature of `message`.
    fn sign(&self, message: &[u8]) -> Result<Vec<u8>>;

    /// The verifier key auditors are given (`<name>+<id>+<base64>`).
    fn verifier_key(&self) -> String {
        format!(
            "{}+{:08x}+{}",
            self.name(),
            key_id(self.name(), self.public_key()),
            BASE64.encode([&[ED25519_TYPE][..], self.public_key()].concat())
        )
    }

    /// The signed note of `text` (which must end in a newline).
    fn sign_note(&self, text: &str) -> Result<String> {
        debug_assert!(text.ends_with('\n'));
        let signature = self.sign(text.as_bytes())?;
        if signature.len() != 64 {
            return Err(Error::internal(format!(
                "the signing key {} gave a {}-byte signature, not an Ed25519 one",
                self.name(),
                signature.len()
            )));
        }
        let id = key_id(self.name(), self.public_key());
        let blob = [&id.to_be_bytes()[..], &signature].concat();
        Ok(format!(
            "{text}\n{SIGNATURE_PREFIX}{} {}\n",
            self.name(),
            BASE64.encode(blob)
        ))
    }
}

/// A public key that checkpoint signatures are checked against.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifierKey {
    name: String,
    id: u32,
    public_key: Vec<u8>,
}

impl VerifierKey {
    /// Parses the verifier keys of setting `setting` (`integrity.trusted_keys`, `--trusted-key`), naming
    /// the entry that is not one.
    pub fn parse_all(setting: &str, keys: &[String]) -> Result<Vec<VerifierKey>> {
        keys.iter()
            .enumerate()
            .map(|(index, key)| {
                VerifierKey::parse(key).map_err(|error| {
                    Error::invalid_argument(format!("{setting}[{index}]: {}", error.message()))
                })
            })
            .collect()
    }

    /// Parses `<name>+<key id>+<base64(0x01 || public key)>`.
    pub fn parse(text: &str) -> Result<VerifierKey> {
        let text = text.trim();
        let bad = |why: &str| {
            Error::invalid_argument(format!("verifier key {text:?} is not valid: {why}"))
        };
        // The base64 key may contain '+' itself: it is the rest after the name and id.
        let mut parts = text.splitn(3, '+');
        let (Some(name), Some(id), Some(material)) = (parts.next(), parts.next(), parts.next())
        else {
            return Err(bad("expected <name>+<key id>+<key>"));
        };
        check_origin(name).map_err(|why| bad(&why))?;
        let material = BASE64
            .decode(material)
            .map_err(|_| bad("the key is not base64"))?;
        if material.len() != 33 || material[0] != ED25519_TYPE {
            return Err(bad("only Ed25519 keys (type 0x01, 32 bytes) are supported"));
        }
        let public_key = material[1..].to_vec();
        let computed = key_id(name, &public_key);
        if format!("{computed:08x}") != id {
            return Err(bad("its key id does not match its name and key"));
        }
        Ok(VerifierKey {
            name: name.to_string(),
            id: computed,
            public_key,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }
}

impl fmt::Display for VerifierKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}+{:08x}+{}",
            self.name,
            self.id,
            BASE64.encode([&[ED25519_TYPE][..], &self.public_key].concat())
        )
    }
}

/// Why a signed note did not open.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NoteError {
    /// Not a signed note at all (no blank line before the signatures, a malformed signature line).
    Malformed(String),
    /// A signature by a trusted key's name and id does not verify: forged or altered.
    BadSignature { key: String },
    /// No signature by any trusted key.
    NotSignedByTrustedKey { signers: Vec<String> },
}

impl fmt::Display for NoteError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NoteError::Malformed(why) => write!(f, "not a signed note: {why}"),
            NoteError::BadSignature { key } => {
                write!(
                    f,
                    "the signature of {key} does not verify (forged or altered)"
                )
            }
            NoteError::NotSignedByTrustedKey { signers } if signers.is_empty() => {
                f.write_str("it carries no signature")
            }
            NoteError::NotSignedByTrustedKey { signers } => write!(
                f,
                "no trusted key signed it (signed by {})",
                signers.join(", ")
            ),
        }
    }
}

/// A signature line of a note: the key name, and the key id followed by the signature.
pub type SignatureLine<'a> = (&'a str, Vec<u8>);

/// Splits a signed note into its text and signature lines, without checking signatures.
pub fn split_note(note: &str) -> std::result::Result<(&str, Vec<SignatureLine<'_>>), NoteError> {
    let malformed = |why: &str| NoteError::Malformed(why.to_string());
    let at = note
        .rfind("\n\n")
        .ok_or_else(|| malformed("no blank line before the signatures"))?;
    let (text, signatures) = (&note[..at + 1], &note[at + 2..]);
    if !signatures.ends_with('\n') {
        return Err(malformed("the signatures do not end in a newline"));
    }
    let mut lines = Vec::new();
    for line in signatures[..signatures.len() - 1].split('\n') {
        let rest = line
            .strip_prefix(SIGNATURE_PREFIX)
            .ok_or_else(|| malformed("a signature line does not start with an em dash"))?;
        let (name, blob) = rest
            .split_once(' ')
            .ok_or_else(|| malformed("a signature line has no signature"))?;
        let blob = BASE64
            .decode(blob)
            .map_err(|_| malformed("a signature is not base64"))?;
        if blob.len() < 5 {
            return Err(malformed("a signature is too short"));
        }
        lines.push((name, blob));
    }
    Ok((text, lines))
}

/// Opens a signed note: its text, once a signature by one of `trusted` verifies. Signatures by other keys are
/// ignored (C2SP signed-note); a signature carrying a trusted key's name and id that does not verify fails.
pub fn open_note<'a>(
    note: &'a str,
    trusted: &[VerifierKey],
) -> std::result::Result<&'a str, NoteError> {
    let (text, signatures) = split_note(note)?;
    let mut verified = false;
    for (name, blob) in &signatures {
        let id = u32::from_be_bytes(blob[..4].try_into().expect("4 bytes"));
        for key in trusted
            .iter()
            .filter(|key| key.name == *name && key.id == id)
        {
            let public_key = UnparsedPublicKey::new(&ED25519, &key.public_key);
            if public_key.verify(text.as_bytes(), &blob[4..]).is_err() {
                return Err(NoteError::BadSignature {
                    key: key.to_string(),
                });
            }
            verified = true;
        }
    }
    if verified {
        Ok(text)
    } else {
        Err(NoteError::NotSignedByTrustedKey {
            signers: signatures
                .iter()
                .map(|(name, _)| name.to_string())
                .collect(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The example of Go's `golang.org/x/mod/sumdb/note` (its package documentation and tests).
    const GO_SIGNING_KEY: &str =
        "PRIVATE+KEY+PeterNeumann+c74f20a3+AYEKFALVFGyNhPJEMzD1QIDr+Y7hfZx09iUvxdXHKDFz";
    const GO_VERIFIER_KEY: &str =
        "PeterNeumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW";
    const GO_TEXT: &str = "If you think cryptography is the answer to your problem,\n\
                           then you don't know what your problem is.\n";
    const GO_NOTE_SIGNATURE: &str = "\u{2014} PeterNeumann x08go/ZJkuBS9UG/SffcvIAQxVBtiFupLLr8pAcElZInNIuGUgYN1FFYC2pZSNXgKvqfqdngotpRZb6KE6RyyBwJnAM=\n";

    #[test]
    fn notes_match_go_sumdb_note_byte_for_byte() {
        let key = SigningKey::parse(GO_SIGNING_KEY).expect("signing key");
        assert_eq!(key.verifier_key(), GO_VERIFIER_KEY);
        let note = key.sign_note(GO_TEXT).expect("signed");
        assert_eq!(note, format!("{GO_TEXT}\n{GO_NOTE_SIGNATURE}"));
        let verifier = VerifierKey::parse(GO_VERIFIER_KEY).expect("verifier key");
        assert_eq!(verifier.to_string(), GO_VERIFIER_KEY);
        assert_eq!(
            open_note(&note, std::slice::from_ref(&verifier)),
            Ok(GO_TEXT)
        );

        // Altered text, a forged signature, an unknown key.
        let altered = note.replacen("problem,", "problem;", 1);
        assert!(matches!(
            open_note(&altered, std::slice::from_ref(&verifier)),
            Err(NoteError::BadSignature { .. })
        ));
        let (other, _) = SigningKey::generate("PeterNeumann").expect("generate");
        assert_eq!(
            open_note(
                &note,
                &[VerifierKey::parse(&other.verifier_key()).expect("key")]
            ),
            Err(NoteError::NotSignedByTrustedKey {
                signers: vec!["PeterNeumann".into()]
            })
        );
        assert!(matches!(
            open_note(GO_TEXT, &[verifier]),
            Err(NoteError::Malformed(_))
        ));
    }

    #[test]
    fn checkpoints_round_trip_and_bad_ones_are_named() {
        let (key, text) = SigningKey::generate("chatvault.example/archive").expect("generate");
        assert!(
            !format!("{key:?}").contains(&text[30..]),
            "Debug shows no secret"
        );
        let again = SigningKey::parse(&text).expect("parse");
        assert_eq!(again.verifier_key(), key.verifier_key());
        let checkpoint = Checkpoint {
            origin: "chatvault.example/archive".into(),
            size: 1234,
            root: [7u8; 32],
        };
        let note = key.sign_note(&checkpoint.text()).expect("signed");
        let trusted = [VerifierKey::parse(&key.verifier_key()).expect("verifier")];
        let opened = open_note(&note, &trusted).expect("open");
        assert_eq!(Checkpoint::parse(opened).expect("parse"), checkpoint);
        for (bad, named) in [
            ("a b\n1\nAAAA\n", "space"),
            ("origin\n-1\nAAAA\n", "tree size"),
            ("origin\n01\nAAAA\n", "tree size"),
            ("origin\n1\nAAAA\n", "32 bytes"),
            ("origin\n1\n", "root"),
        ] {
            let error = Checkpoint::parse(bad).expect_err(bad);
            assert!(error.message().contains(named), "{bad:?}: {error}");
        }
        let error = SigningKey::parse("PRIVATE+KEY+x+00000000+AAAA").expect_err("bad key");
        assert!(!error.message().contains("AAAA"), "{error}");
    }
}
