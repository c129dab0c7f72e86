//! Per-part checksums as S3 expects them (base64 of the big-endian digest)
//! and the composite checksum of a multipart object.

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use sha2::{Digest, Sha256};
use stowage_common::spec::ChecksumAlgorithm;

/// Base64 checksum of one part (or a whole single-PUT object).
pub fn part_checksum(algorithm: ChecksumAlgorithm, data: &[u8]) -> String {
    B64.encode(raw(algorithm, data))
}

fn raw(algorithm: ChecksumAlgorithm, data: &[u8]) -> Vec<u8> {
    match algorithm {
        ChecksumAlgorithm::Crc32c => {
            let crc = crc_fast::checksum(crc_fast::CrcAlgorithm::Crc32Iscsi, data) as u32;
            crc.to_be_bytes().to_vec()
        }
        ChecksumAlgorithm::Sha256 => Sha256::digest(data).to_vec(),
    }
}

/// S3's composite ("checksum of checksums") value of a multipart object:
/// `base64(H(raw part checksums concatenated))-<parts>`.
pub fn composite_checksum(algorithm: ChecksumAlgorithm, parts_b64: &[String]) -> Option<String> {
    let mut concat = Vec::new();
    for p in parts_b64 {
        concat.extend(B64.decode(p).ok()?);
    }
    Some(format!(
        "{}-{}",
        B64.encode(raw(algorithm, &concat)),
        parts_b64.len()
    ))
}

pub fn parse_algorithm(s: &str) -> Option<ChecksumAlgorithm> {
    match s {
        "crc32c" => Some(ChecksumAlgorithm::Crc32c),
        "sha256" => Some(ChecksumAlgorithm::Sha256),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_vectors() {
        // CRC-32C("123456789") = 0xE3069283 (RFC 3720 check value).
        assert_eq!(
            part_checksum(ChecksumAlgorithm::Crc32c, b"123456789"),
            B64.encode(0xE306_9283_u32.to_be_bytes())
        );
        assert_eq!(
            part_checksum(ChecksumAlgorithm::Sha256, b""),
            "47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU="
        );
        let parts = vec![
            part_checksum(ChecksumAlgorithm::Crc32c, b"a"),
            part_checksum(ChecksumAlgorithm::Crc32c, b"b"),
        ];
        let c = composite_checksum(ChecksumAlgorithm::Crc32c, &parts).expect("valid base64");
        assert!(c.ends_with("-2"));
    }
}
