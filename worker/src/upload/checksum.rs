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

/// The checksums of consecutive `part_size` slices of a stream (the last
/// one shorter), computed as it flows by: what [`part_checksum`] gives for
/// each part the stream is cut into, without holding a part in memory.
pub struct PartChecksums {
    algorithm: ChecksumAlgorithm,
    part_size: u64,
    filled: u64,
    current: Running,
    done: Vec<String>,
}

enum Running {
    Crc32c(crc_fast::Digest),
    Sha256(Sha256),
}

impl Running {
    fn new(algorithm: ChecksumAlgorithm) -> Running {
        match algorithm {
            ChecksumAlgorithm::Crc32c => {
                Running::Crc32c(crc_fast::Digest::new(crc_fast::CrcAlgorithm::Crc32Iscsi))
            }
            ChecksumAlgorithm::Sha256 => Running::Sha256(Sha256::new()),
        }
    }

    fn update(&mut self, data: &[u8]) {
        match self {
            Running::Crc32c(d) => d.update(data),
            Running::Sha256(d) => d.update(data),
        }
    }

    fn finish(self) -> String {
        match self {
            Running::Crc32c(d) => B64.encode((d.finalize() as u32).to_be_bytes()),
            Running::Sha256(d) => B64.encode(d.finalize()),
        }
    }
}

impl PartChecksums {
    pub fn new(algorithm: ChecksumAlgorithm, part_size: u64) -> Self {
        PartChecksums {
            algorithm,
            part_size: part_size.max(1),
            filled: 0,
            current: Running::new(algorithm),
            done: Vec::new(),
        }
    }

    pub fn update(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            let room = usize::try_from(self.part_size - self.filled).unwrap_or(usize::MAX);
            let take = room.min(data.len());
            self.current.update(&data[..take]);
            self.filled += take as u64;
            data = &data[take..];
            if self.filled == self.part_size {
                let full = std::mem::replace(&mut self.current, Running::new(self.algorithm));
                self.done.push(full.finish());
                self.filled = 0;
            }
        }
    }

    /// One checksum per part, in order.
    pub fn finish(mut self) -> Vec<String> {
        if self.filled > 0 {
            self.done.push(self.current.finish());
        }
        self.done
    }
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

    #[test]
    fn part_checksums_match_whatever_the_chunking() {
        let data: Vec<u8> = (0..10_000u32).map(|i| (i * 7 % 251) as u8).collect();
        for algorithm in [ChecksumAlgorithm::Crc32c, ChecksumAlgorithm::Sha256] {
            let expected: Vec<String> = data
                .chunks(1024)
                .map(|p| part_checksum(algorithm, p))
                .collect();
            for chunk in [1, 100, 1024, 3000, 10_000] {
                let mut p = PartChecksums::new(algorithm, 1024);
                data.chunks(chunk).for_each(|c| p.update(c));
                assert_eq!(p.finish(), expected, "{algorithm:?} in chunks of {chunk}");
            }
            assert!(PartChecksums::new(algorithm, 1024).finish().is_empty());
        }
    }
}
