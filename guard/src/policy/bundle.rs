//! Signed policy bundles: the policy files of a directory, a `MANIFEST` naming each with its
//! SHA-256, and a minisign (ed25519) signature over the manifest, in one `.tar.gz`. The
//! manifest's SHA-256 is the policy set's hash ([`digest`]); a directory loaded as is has the
//! same hash as a bundle of it, so hosts that load either can be compared.
//!
//! Pure apart from the signing key's randomness: bytes in, checked files out. Fetching and
//! applying live in the daemon.

use std::io::{Cursor, Read};

use sha2::{Digest, Sha256};

pub const MANIFEST: &str = "MANIFEST";
pub const SIGNATURE: &str = "MANIFEST.minisig";
/// What the signature's trusted comment starts with; the signing time follows, so a host never
/// goes back to an older bundle than the one in force (a replayed old bundle is refused).
const COMMENT: &str = "guard-policy-bundle signed:";
/// Bounds on what a source may hand us (the bundle compressed and unpacked, and files).
pub const MAX_BUNDLE: usize = 16 << 20;
const MAX_UNPACKED: u64 = 64 << 20;
const MAX_FILES: usize = 4096;

/// Policy files: (file name, text), sorted by name.
pub type Files = Vec<(String, String)>;

/// A bundle that verified: its files and when it was signed (Unix seconds).
#[derive(Debug)]
pub struct Verified {
    pub files: Files,
    pub signed_at: u64,
    pub sha256: String,
}

/// The manifest of `files`: a line `SHA256  NAME` per file, in name order.
pub fn manifest(files: &[(String, String)]) -> String {
    let mut sorted: Vec<&(String, String)> = files.iter().collect();
    sorted.sort_by(|a, b| a.0.cmp(&b.0));
    let mut m = String::new();
    for (name, text) in sorted {
        m.push_str(&hex(&Sha256::digest(text.as_bytes())));
        m.push_str("  ");
        m.push_str(name);
        m.push('\n');
    }
    m
}

/// The hash of a policy set: SHA-256 of its manifest (file names without directories).
pub fn digest(files: &[(String, String)]) -> String {
    let base: Files = files
        .iter()
        .map(|(n, t)| (n.rsplit('/').next().unwrap_or(n).to_string(), t.clone()))
        .collect();
    hex(&Sha256::digest(manifest(&base).as_bytes()))
}

fn hex(b: &[u8]) -> String {
    const H: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(b.len() * 2);
    for x in b {
        s.push(H[(x >> 4) as usize] as char);
        s.push(H[(x & 15) as usize] as char);
    }
    s
}

/// A policy file name a bundle may hold: `NAME.json`, no directory, not hidden.
fn valid_name(n: &str) -> bool {
    n.ends_with(".json")
        && !n.starts_with('.')
        && !n.contains('/')
        && !n.contains('\\')
        && n.chars().all(|c| !c.is_control())
}

/// The public key of `verify_key`: minisign's base64 line (`RW...`) or a `.pub` file's text.
pub fn public_key(text: &str) -> Result<minisign::PublicKey, String> {
    let line = text
        .lines()
        .map(str::trim)
        .rfind(|l| !l.is_empty() && !l.starts_with("untrusted comment:"))
        .unwrap_or("");
    minisign::PublicKey::from_base64(line).map_err(|e| {
        format!("not a minisign public key ({e}); expected the `RW...` line of a .pub file")
    })
}

/// A new key pair: (secret key file text, public key file text). The secret key is encrypted
/// with `password`; an empty one leaves it in the clear (for a signing host's secret store;
/// keep it mode 0600).
pub fn keygen(password: &str) -> Result<(String, String), String> {
    let kp = minisign::KeyPair::generate_encrypted_keypair(Some(password.to_string()))
        .map_err(|e| e.to_string())?;
    let sk = kp.sk.to_box(None).map_err(|e| e.to_string())?.into_string();
    let pk = kp.pk.to_box().map_err(|e| e.to_string())?.into_string();
    Ok((sk, pk))
}

/// The bundle (`.tar.gz`) of `files`, signed with the secret key `sk` (minisign's text form;
/// `password` for an encrypted one; none: an unencrypted key, never a prompt), signed at `now` (Unix seconds).
pub fn pack(
    files: &[(String, String)],
    sk: &str,
    password: Option<String>,
    now: u64,
) -> Result<Vec<u8>, String> {
    if files.is_empty() {
        return Err("no policy file (*.json) to sign".into());
    }
    for (n, _) in files {
        if !valid_name(n) {
            return Err(format!("`{n}` is not a policy file name (NAME.json)"));
        }
    }
    let sk = minisign::SecretKeyBox::from_string(sk)
        .and_then(|b| b.into_secret_key(Some(password.unwrap_or_default())))
        .map_err(|e| format!("not a usable minisign secret key: {e}"))?;
    let manifest = manifest(files);
    let comment = format!("{COMMENT}{now}");
    let sig = minisign::sign(
        None,
        &sk,
        Cursor::new(manifest.as_bytes()),
        Some(&comment),
        Some("guard policy bundle"),
    )
    .map_err(|e| format!("signing: {e}"))?
    .into_string();
    let mut sorted: Vec<&(String, String)> = files.iter().collect();
    sorted.sort_by(|a, b| a.0.cmp(&b.0));
    let gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    let mut tar = tar::Builder::new(gz);
    let mut add = |name: &str, data: &[u8]| -> std::io::Result<()> {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_mtime(now);
        h.set_entry_type(tar::EntryType::Regular);
        tar.append_data(&mut h, name, data)
    };
    let io = |e: std::io::Error| format!("writing the bundle: {e}");
    add(MANIFEST, manifest.as_bytes()).map_err(io)?;
    add(SIGNATURE, sig.as_bytes()).map_err(io)?;
    for (n, t) in sorted {
        add(n, t.as_bytes()).map_err(io)?;
    }
    tar.into_inner()
        .and_then(|gz| gz.finish())
        .map_err(|e| format!("writing the bundle: {e}"))
}

/// The entries of a bundle (`.tar.gz`): regular files only, bounded in number and size.
pub fn unpack(bundle: &[u8]) -> Result<Vec<(String, Vec<u8>)>, String> {
    if bundle.len() > MAX_BUNDLE {
        return Err(format!("bundle larger than {} bytes", MAX_BUNDLE));
    }
    let gz = flate2::read::GzDecoder::new(bundle);
    let mut ar = tar::Archive::new(gz.take(MAX_UNPACKED + 1));
    let mut out = Vec::new();
    let mut total = 0u64;
    let entries = ar
        .entries()
        .map_err(|e| format!("not a .tar.gz bundle: {e}"))?;
    for e in entries {
        let mut e = e.map_err(|e| format!("not a .tar.gz bundle: {e}"))?;
        let kind = e.header().entry_type();
        let path = e
            .path()
            .map_err(|e| format!("bad entry name: {e}"))?
            .to_string_lossy()
            .into_owned();
        let name = path.strip_prefix("./").unwrap_or(&path).to_string();
        if kind.is_dir() && (name.is_empty() || name == ".") {
            continue;
        }
        if !kind.is_file() {
            return Err(format!("`{name}` is not a regular file"));
        }
        total += e.size();
        if total > MAX_UNPACKED || out.len() >= MAX_FILES {
            return Err("bundle too large when unpacked".into());
        }
        let mut data = Vec::with_capacity(e.size() as usize);
        e.read_to_end(&mut data)
            .map_err(|e| format!("reading `{name}`: {e}"))?;
        out.push((name, data));
    }
    Ok(out)
}

/// Checks `entries` (a bundle's, or a directory's files) against the key: the signature over
/// the manifest verifies, the manifest names exactly the policy files there and their hashes
/// match. Nothing else may be in it.
pub fn verify(
    entries: Vec<(String, Vec<u8>)>,
    key: &minisign::PublicKey,
) -> Result<Verified, String> {
    let mut manifest_bytes = None;
    let mut sig = None;
    let mut files: Vec<(String, Vec<u8>)> = Vec::new();
    for (name, data) in entries {
        match name.as_str() {
            MANIFEST if manifest_bytes.is_none() => manifest_bytes = Some(data),
            SIGNATURE if sig.is_none() => sig = Some(data),
            MANIFEST | SIGNATURE => return Err(format!("`{name}` appears twice")),
            n if valid_name(n) => {
                if files.iter().any(|(x, _)| x == n) {
                    return Err(format!("`{n}` appears twice"));
                }
                files.push((name, data));
            }
            n => return Err(format!("`{n}` is not a policy file (NAME.json)")),
        }
    }
    let manifest_bytes = manifest_bytes.ok_or("no MANIFEST: not a guard policy bundle")?;
    let sig = sig.ok_or("no MANIFEST.minisig: the bundle is not signed")?;
    let sig = std::str::from_utf8(&sig)
        .ok()
        .and_then(|s| minisign::SignatureBox::from_string(s).ok())
        .ok_or("MANIFEST.minisig is not a minisign signature")?;
    minisign::verify(key, &sig, Cursor::new(&manifest_bytes), true, false, false)
        .map_err(|e| format!("the signature does not verify with policy.verify_key: {e}"))?;
    let comment = sig
        .trusted_comment()
        .map_err(|e| format!("signature comment: {e}"))?;
    let signed_at = comment
        .strip_prefix(COMMENT)
        .and_then(|t| t.trim().parse::<u64>().ok())
        .ok_or("the signature's trusted comment is not guard's: sign with `guard policy sign`")?;
    let manifest = std::str::from_utf8(&manifest_bytes).map_err(|_| "MANIFEST is not UTF-8")?;
    // From here on the manifest is the signer's: the files must be exactly what it names.
    let mut named: Vec<(&str, &str)> = Vec::new();
    for line in manifest.lines() {
        let (hash, name) = line
            .split_once("  ")
            .ok_or_else(|| format!("MANIFEST line `{line}` is not `SHA256  NAME`"))?;
        if named.iter().any(|(_, n)| *n == name) {
            return Err(format!("MANIFEST names `{name}` twice"));
        }
        named.push((hash, name));
    }
    if named.len() != files.len() {
        return Err(format!(
            "MANIFEST names {} files, the bundle holds {}",
            named.len(),
            files.len()
        ));
    }
    let mut out: Files = Vec::new();
    for (hash, name) in named {
        let (_, data) = files
            .iter()
            .find(|(n, _)| n == name)
            .ok_or_else(|| format!("`{name}` is in MANIFEST but not in the bundle"))?;
        if hex(&Sha256::digest(data)) != hash {
            return Err(format!("`{name}` does not match its hash in MANIFEST"));
        }
        let text = String::from_utf8(data.clone()).map_err(|_| format!("`{name}` is not UTF-8"))?;
        out.push((name.to_string(), text));
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    let sha256 = hex(&Sha256::digest(manifest.as_bytes()));
    if manifest != self::manifest(&out) {
        // Same files, another order or spacing: the hash must be the one hosts compare.
        return Err("MANIFEST is not in guard's form (sorted `SHA256  NAME` lines)".into());
    }
    Ok(Verified {
        files: out,
        signed_at,
        sha256,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files() -> Files {
        vec![
            ("b.json".into(), "{\"server\":{}}".into()),
            ("a.json".into(), "{}".into()),
        ]
    }

    fn keys() -> (String, minisign::PublicKey) {
        let (sk, pk) = keygen("").unwrap();
        (sk, public_key(&pk).unwrap())
    }

    #[test]
    fn a_signed_bundle_verifies_and_hashes_as_its_directory() {
        let (sk, pk) = keys();
        let b = pack(&files(), &sk, None, 1000).unwrap();
        let v = verify(unpack(&b).unwrap(), &pk).unwrap();
        assert_eq!(v.signed_at, 1000);
        assert_eq!(v.files[0].0, "a.json");
        assert_eq!(v.sha256, digest(&files()));
        // The directory form: names with a directory hash alike.
        let dir: Files = files()
            .into_iter()
            .map(|(n, t)| (format!("/etc/guard/policies/{n}"), t))
            .collect();
        assert_eq!(digest(&dir), v.sha256);
    }

    #[test]
    fn another_key_an_edited_file_or_an_extra_file_is_refused() {
        let (sk, _) = keys();
        let (_, other) = keys();
        let b = pack(&files(), &sk, None, 1).unwrap();
        let e = verify(unpack(&b).unwrap(), &other).unwrap_err();
        assert!(e.contains("does not verify"), "{e}");

        let (sk, pk) = keys();
        let b = pack(&files(), &sk, None, 1).unwrap();
        let mut entries = unpack(&b).unwrap();
        let i = entries.iter().position(|(n, _)| n == "a.json").unwrap();
        entries[i].1 = b"{\"x\":1}".to_vec();
        let e = verify(entries, &pk).unwrap_err();
        assert!(e.contains("does not match its hash"), "{e}");

        let mut entries = unpack(&b).unwrap();
        entries.push(("c.json".into(), b"{}".to_vec()));
        let e = verify(entries, &pk).unwrap_err();
        assert!(e.contains("MANIFEST names 2 files"), "{e}");

        let mut entries = unpack(&b).unwrap();
        entries.retain(|(n, _)| n != SIGNATURE);
        assert!(verify(entries, &pk).unwrap_err().contains("not signed"));

        let mut entries = unpack(&b).unwrap();
        entries.push(("../evil.json".into(), b"{}".to_vec()));
        assert!(verify(entries, &pk).is_err());
    }

    #[test]
    fn garbage_and_bombs_are_refused() {
        let (_, pk) = keys();
        assert!(unpack(b"not a bundle").is_err());
        assert!(unpack(&vec![0u8; MAX_BUNDLE + 1]).is_err());
        assert!(verify(vec![], &pk).unwrap_err().contains("no MANIFEST"));
        // A tar with a symlink entry.
        let gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        let mut t = tar::Builder::new(gz);
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Symlink);
        h.set_size(0);
        t.append_link(&mut h, "a.json", "/etc/shadow").unwrap();
        let b = t.into_inner().unwrap().finish().unwrap();
        assert!(unpack(&b).unwrap_err().contains("not a regular file"));
    }

    #[test]
    fn an_encrypted_key_needs_its_password() {
        let (sk, pk) = keygen("s3cret").unwrap();
        let pk = public_key(&pk).unwrap();
        assert!(pack(&files(), &sk, None, 1)
            .unwrap_err()
            .contains("Wrong password"));
        let b = pack(&files(), &sk, Some("s3cret".into()), 1).unwrap();
        assert!(verify(unpack(&b).unwrap(), &pk).is_ok());
    }

    #[test]
    fn public_keys_are_read_from_the_line_or_the_file() {
        let (_, pk_file) = keygen("").unwrap();
        let line = pk_file.lines().last().unwrap().to_string();
        assert!(public_key(&pk_file).is_ok());
        assert!(public_key(&line).is_ok());
        assert!(public_key("RWnope").is_err());
    }
}
