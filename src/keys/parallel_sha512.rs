//! SHA-512 of many independent messages at once: eight per AVX-512 register, or four per AVX2
//! register on CPUs without AVX-512.
//!
//! Why this exists: a `/send` body fanned out to a thousand servers gets a thousand X-Matrix
//! signatures, and each Ed25519 signature hashes its whole message once more after its own
//! nonce point `R` (RFC 8032 §5.1.6, the challenge `k = H(R || A || M)`). With a 30 KB body that
//! hash was ~49 µs of a ~64 µs header. One SHA-512 is a serial chain of 80 rounds per block, but
//! different messages have no data in common, so several of them fill the 64-bit lanes of one
//! vector register and every instruction advances all of them.
//!
//! No small, maintained crate offers multi-message SHA-512: the sha2 crate hashes one message
//! at a time, and the one toolkit with an eight-lane kernel (commonware-cryptography) brings a
//! whole cryptography stack (BLS over blst, P-256, ChaCha20-Poly1305) with it. The kernels here
//! are the FIPS 180-4 compression function written with AVX-512F and with AVX2 intrinsics; the
//! sha2 crate remains the reference and the fallback on CPUs with neither, and the tests compare
//! each kernel this CPU runs with it on every length class (and the FIPS examples).

use sha2::{Digest, Sha512};

/// The most messages a kernel hashes together (AVX-512: eight 64-bit lanes).
pub const MAX_LANES: usize = 8;

/// Which kernel this CPU runs, and how many messages it hashes together.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernel {
    /// Eight lanes of a 512-bit register.
    Avx512,
    /// Four lanes of a 256-bit register: AVX2 has no 64-bit rotate, so each rotation is two
    /// shifts and an OR, and it is slower per lane than AVX-512, but still well ahead of hashing
    /// one message at a time.
    Avx2,
}

impl Kernel {
    /// The best kernel this CPU has; `None`: messages are hashed one at a time.
    pub fn detect() -> Option<Kernel> {
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512f") {
                return Some(Kernel::Avx512);
            }
            if std::arch::is_x86_feature_detected!("avx2") {
                return Some(Kernel::Avx2);
            }
        }
        None
    }

    pub fn lanes(self) -> usize {
        match self {
            Kernel::Avx512 => 8,
            Kernel::Avx2 => 4,
        }
    }

    /// The digests of up to [`Kernel::lanes`] messages.
    ///
    /// # Safety
    /// The CPU must have the kernel's instructions: use a kernel [`Kernel::detect`] returned.
    #[cfg(target_arch = "x86_64")]
    unsafe fn hash_group<const P: usize>(self, group: &[[&[u8]; P]]) -> Vec<[u8; 64]> {
        debug_assert!(group.len() <= self.lanes());
        // SAFETY: the caller guarantees the instruction set.
        let digests = unsafe {
            match self {
                Kernel::Avx512 => avx512::hash_group(group),
                Kernel::Avx2 => avx2::hash_group(group),
            }
        };
        digests[..group.len()].to_vec()
    }
}

/// The SHA-512 digest of each message, in order. A message is the concatenation of its `P`
/// parts, so callers need not copy a shared body into each message.
pub fn sha512_each<const P: usize>(messages: &[[&[u8]; P]]) -> Vec<[u8; 64]> {
    sha512_each_with(Kernel::detect(), messages)
}

/// [`sha512_each`] with the given kernel (`None`: the sha2 crate alone). Groups of fewer than
/// half a kernel's lanes are hashed one at a time: the idle lanes would cost more.
fn sha512_each_with<const P: usize>(kernel: Option<Kernel>, messages: &[[&[u8]; P]]) -> Vec<[u8; 64]> {
    let lanes = kernel.map_or(1, Kernel::lanes);
    let mut digests = Vec::with_capacity(messages.len());
    for group in messages.chunks(lanes) {
        match kernel {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `kernel` came from `Kernel::detect` (the callers and tests ensure it).
            Some(kernel) if group.len() * 2 >= lanes => digests.extend(unsafe { kernel.hash_group(group) }),
            _ => digests.extend(group.iter().map(sha512_one)),
        }
    }
    digests
}

/// One message with the sha2 crate: the reference and the fallback.
fn sha512_one<const P: usize>(parts: &[&[u8]; P]) -> [u8; 64] {
    let mut hash = Sha512::new();
    for part in parts {
        hash.update(part);
    }
    hash.finalize().into()
}

/// Feeds the padded blocks of up to `lanes` messages to `compress`, one block per message at a
/// time, lane-interleaved (word `t` of lane `l` at `block[t * lanes + l]`, so one load gives
/// word `t` of every lane), with a bit per lane that still has a block; until all are done.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
fn feed_blocks<const P: usize>(
    group: &[[&[u8]; P]],
    lanes: usize,
    mut compress: impl FnMut(&[u64; 16 * MAX_LANES], u8),
) {
    debug_assert!(group.len() <= lanes && lanes <= MAX_LANES);
    let mut messages: Vec<PaddedBlocks<'_, P>> = group.iter().map(PaddedBlocks::new).collect();
    let mut block = [0u64; 16 * MAX_LANES];
    loop {
        let mut active: u8 = 0;
        for (lane, message) in messages.iter_mut().enumerate() {
            if message.blocks_left() > 0 {
                message.next_block(&mut block[lane..], lanes);
                active |= 1 << lane;
            }
        }
        if active == 0 {
            return;
        }
        compress(&block, active);
    }
}

/// The digests from a kernel's final state: `words[i][l]` is word `i` of lane `l`.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
fn digests_of(words: &[[u64; MAX_LANES]; 8]) -> [[u8; 64]; MAX_LANES] {
    let mut digests = [[0u8; 64]; MAX_LANES];
    for (index, lanes) in words.iter().enumerate() {
        for (digest, value) in digests.iter_mut().zip(lanes) {
            digest[index * 8..index * 8 + 8].copy_from_slice(&value.to_be_bytes());
        }
    }
    digests
}

/// FIPS 180-4 §4.2.3: the first 64 bits of the fractional parts of the cube roots of the first
/// 80 primes.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
#[rustfmt::skip]
const ROUND_CONSTANTS: [u64; 80] = [
    0x428a2f98d728ae22, 0x7137449123ef65cd, 0xb5c0fbcfec4d3b2f, 0xe9b5dba58189dbbc,
    0x3956c25bf348b538, 0x59f111f1b605d019, 0x923f82a4af194f9b, 0xab1c5ed5da6d8118,
    0xd807aa98a3030242, 0x12835b0145706fbe, 0x243185be4ee4b28c, 0x550c7dc3d5ffb4e2,
    0x72be5d74f27b896f, 0x80deb1fe3b1696b1, 0x9bdc06a725c71235, 0xc19bf174cf692694,
    0xe49b69c19ef14ad2, 0xefbe4786384f25e3, 0x0fc19dc68b8cd5b5, 0x240ca1cc77ac9c65,
    0x2de92c6f592b0275, 0x4a7484aa6ea6e483, 0x5cb0a9dcbd41fbd4, 0x76f988da831153b5,
    0x983e5152ee66dfab, 0xa831c66d2db43210, 0xb00327c898fb213f, 0xbf597fc7beef0ee4,
    0xc6e00bf33da88fc2, 0xd5a79147930aa725, 0x06ca6351e003826f, 0x142929670a0e6e70,
    0x27b70a8546d22ffc, 0x2e1b21385c26c926, 0x4d2c6dfc5ac42aed, 0x53380d139d95b3df,
    0x650a73548baf63de, 0x766a0abb3c77b2a8, 0x81c2c92e47edaee6, 0x92722c851482353b,
    0xa2bfe8a14cf10364, 0xa81a664bbc423001, 0xc24b8b70d0f89791, 0xc76c51a30654be30,
    0xd192e819d6ef5218, 0xd69906245565a910, 0xf40e35855771202a, 0x106aa07032bbd1b8,
    0x19a4c116b8d2d0c8, 0x1e376c085141ab53, 0x2748774cdf8eeb99, 0x34b0bcb5e19b48a8,
    0x391c0cb3c5c95a63, 0x4ed8aa4ae3418acb, 0x5b9cca4f7763e373, 0x682e6ff3d6b2b8a3,
    0x748f82ee5defb2fc, 0x78a5636f43172f60, 0x84c87814a1f0ab72, 0x8cc702081a6439ec,
    0x90befffa23631e28, 0xa4506cebde82bde9, 0xbef9a3f7b2c67915, 0xc67178f2e372532b,
    0xca273eceea26619c, 0xd186b8c721c0c207, 0xeada7dd6cde0eb1e, 0xf57d4f7fee6ed178,
    0x06f067aa72176fba, 0x0a637dc5a2c898a6, 0x113f9804bef90dae, 0x1b710b35131c471b,
    0x28db77f523047d84, 0x32caab7b40c72493, 0x3c9ebe0a15c9bebc, 0x431d67c49c100d4c,
    0x4cc5d4becb3e42b6, 0x597f299cfc657e2a, 0x5fcb6fab3ad6faec, 0x6c44198c4a475817,
];

/// FIPS 180-4 §5.3.5: the initial hash value of SHA-512.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
#[rustfmt::skip]
const INITIAL_STATE: [u64; 8] = [
    0x6a09e667f3bcc908, 0xbb67ae8584caa73b, 0x3c6ef372fe94f82b, 0xa54ff53a5f1d36f1,
    0x510e527fade682d1, 0x9b05688c2b3e6c1f, 0x1f83d9abfb41bd6b, 0x5be0cd19137e2179,
];

/// Walks one message's padded blocks (FIPS 180-4 §5.1.2: the data, one `0x80` byte, zeros,
/// and the length in bits as a 128-bit big-endian number ending the last block) as big-endian
/// words, without copying the message into one buffer.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
struct PaddedBlocks<'a, const P: usize> {
    parts: &'a [&'a [u8]; P],
    part: usize,
    offset: usize,
    bit_length: u128,
    blocks_left: usize,
    marker_written: bool,
}

#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
impl<'a, const P: usize> PaddedBlocks<'a, P> {
    fn new(parts: &'a [&'a [u8]; P]) -> Self {
        let length: usize = parts.iter().map(|part| part.len()).sum();
        // The data, the 0x80 byte and the 16-byte length, rounded up to whole blocks.
        let blocks_left = (length + 17).div_ceil(128);
        PaddedBlocks { parts, part: 0, offset: 0, bit_length: length as u128 * 8, blocks_left, marker_written: false }
    }

    fn blocks_left(&self) -> usize {
        self.blocks_left
    }

    /// Writes the next block's sixteen words to `words[0]`, `words[stride]`, … (the caller's
    /// lane-interleaved layout).
    fn next_block(&mut self, words: &mut [u64], stride: usize) {
        debug_assert!(self.blocks_left > 0);
        self.skip_empty_parts();
        if self.part < P && self.parts[self.part].len() - self.offset >= 128 {
            // The common case, a block wholly inside one part: read it in place.
            let block = &self.parts[self.part][self.offset..self.offset + 128];
            for (i, word) in block.chunks_exact(8).enumerate() {
                words[i * stride] = u64::from_be_bytes(word.try_into().expect("8 bytes"));
            }
            self.offset += 128;
        } else {
            let block = self.gather_block();
            for (i, word) in block.chunks_exact(8).enumerate() {
                words[i * stride] = u64::from_be_bytes(word.try_into().expect("8 bytes"));
            }
        }
        self.blocks_left -= 1;
    }

    /// A block that spans parts or holds padding, copied together.
    fn gather_block(&mut self) -> [u8; 128] {
        let mut block = [0u8; 128];
        let mut filled = 0;
        while filled < 128 && self.part < P {
            let rest = &self.parts[self.part][self.offset..];
            let take = rest.len().min(128 - filled);
            block[filled..filled + take].copy_from_slice(&rest[..take]);
            filled += take;
            self.offset += take;
            self.skip_empty_parts();
        }
        if filled < 128 && !self.marker_written {
            block[filled] = 0x80;
            self.marker_written = true;
        }
        if self.blocks_left == 1 {
            block[112..].copy_from_slice(&self.bit_length.to_be_bytes());
        }
        block
    }

    fn skip_empty_parts(&mut self) {
        while self.part < P && self.offset == self.parts[self.part].len() {
            self.part += 1;
            self.offset = 0;
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use crate::keys::parallel_sha512::{digests_of, feed_blocks, INITIAL_STATE, MAX_LANES, ROUND_CONSTANTS};

    const LANES: usize = 8;

    /// `_mm512_ternarylogic_epi64` truth tables: `a ? b : c`, the majority, and `a ^ b ^ c`.
    const CHOOSE: i32 = 0xca;
    const MAJORITY: i32 = 0xe8;
    const XOR3: i32 = 0x96;

    /// The digests of up to eight messages; lanes past `group.len()` are zero.
    #[target_feature(enable = "avx512f")]
    pub(super) fn hash_group<const P: usize>(group: &[[&[u8]; P]]) -> [[u8; 64]; MAX_LANES] {
        let mut state = INITIAL_STATE.map(|word| _mm512_set1_epi64(word as i64));
        feed_blocks(group, LANES, |block, active| compress(&mut state, block, active));
        let mut words = [[0u64; MAX_LANES]; 8];
        for (lanes, word) in words.iter_mut().zip(state) {
            // SAFETY: `lanes` has room for the register's eight words.
            unsafe { _mm512_storeu_epi64(lanes.as_mut_ptr() as *mut i64, word) };
        }
        digests_of(&words)
    }

    /// One block per lane (FIPS 180-4 §6.4.2); lanes not in `active` keep their state.
    #[target_feature(enable = "avx512f")]
    fn compress(state: &mut [__m512i; 8], block: &[u64; 16 * MAX_LANES], active: u8) {
        let mut schedule = [_mm512_setzero_si512(); 16];
        for (t, word) in schedule.iter_mut().enumerate() {
            // SAFETY: `block` holds LANES words from `t * LANES` on, for t < 16.
            *word = unsafe { _mm512_loadu_epi64(block[t * LANES..].as_ptr() as *const i64) };
        }
        let [mut a, mut b, mut c, mut d, mut e, mut f, mut g, mut h] = *state;
        for (t, constant) in ROUND_CONSTANTS.iter().enumerate() {
            if t >= 16 {
                schedule[t % 16] = next_schedule_word(&schedule, t);
            }
            let sigma1 = _mm512_ternarylogic_epi64::<XOR3>(
                _mm512_ror_epi64::<14>(e),
                _mm512_ror_epi64::<18>(e),
                _mm512_ror_epi64::<41>(e),
            );
            let t1 = _mm512_add_epi64(
                _mm512_add_epi64(h, sigma1),
                _mm512_add_epi64(
                    _mm512_ternarylogic_epi64::<CHOOSE>(e, f, g),
                    _mm512_add_epi64(_mm512_set1_epi64(*constant as i64), schedule[t % 16]),
                ),
            );
            let sigma0 = _mm512_ternarylogic_epi64::<XOR3>(
                _mm512_ror_epi64::<28>(a),
                _mm512_ror_epi64::<34>(a),
                _mm512_ror_epi64::<39>(a),
            );
            let t2 = _mm512_add_epi64(sigma0, _mm512_ternarylogic_epi64::<MAJORITY>(a, b, c));
            h = g;
            g = f;
            f = e;
            e = _mm512_add_epi64(d, t1);
            d = c;
            c = b;
            b = a;
            a = _mm512_add_epi64(t1, t2);
        }
        for (word, working) in state.iter_mut().zip([a, b, c, d, e, f, g, h]) {
            *word = _mm512_mask_add_epi64(*word, active, *word, working);
        }
    }

    /// `W[t] = σ1(W[t-2]) + W[t-7] + σ0(W[t-15]) + W[t-16]`, with the last sixteen kept in a ring.
    #[target_feature(enable = "avx512f")]
    fn next_schedule_word(schedule: &[__m512i; 16], t: usize) -> __m512i {
        let (w2, w7, w15, w16) =
            (schedule[(t - 2) % 16], schedule[(t - 7) % 16], schedule[(t - 15) % 16], schedule[t % 16]);
        let small_sigma0 = _mm512_ternarylogic_epi64::<XOR3>(
            _mm512_ror_epi64::<1>(w15),
            _mm512_ror_epi64::<8>(w15),
            _mm512_srli_epi64::<7>(w15),
        );
        let small_sigma1 = _mm512_ternarylogic_epi64::<XOR3>(
            _mm512_ror_epi64::<19>(w2),
            _mm512_ror_epi64::<61>(w2),
            _mm512_srli_epi64::<6>(w2),
        );
        _mm512_add_epi64(_mm512_add_epi64(small_sigma1, w7), _mm512_add_epi64(small_sigma0, w16))
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use crate::keys::parallel_sha512::{digests_of, feed_blocks, INITIAL_STATE, MAX_LANES, ROUND_CONSTANTS};

    const LANES: usize = 4;

    /// The digests of up to four messages; lanes past `group.len()` are zero.
    #[target_feature(enable = "avx2")]
    pub(super) fn hash_group<const P: usize>(group: &[[&[u8]; P]]) -> [[u8; 64]; MAX_LANES] {
        let mut state = INITIAL_STATE.map(|word| _mm256_set1_epi64x(word as i64));
        feed_blocks(group, LANES, |block, active| compress(&mut state, block, active));
        let mut words = [[0u64; MAX_LANES]; 8];
        for (lanes, word) in words.iter_mut().zip(state) {
            // SAFETY: `lanes` has room for the register's four words (unaligned store).
            unsafe { _mm256_storeu_si256(lanes.as_mut_ptr() as *mut __m256i, word) };
        }
        digests_of(&words)
    }

    /// One block per lane (FIPS 180-4 §6.4.2); lanes not in `active` keep their state.
    #[target_feature(enable = "avx2")]
    fn compress(state: &mut [__m256i; 8], block: &[u64; 16 * MAX_LANES], active: u8) {
        let mut schedule = [_mm256_setzero_si256(); 16];
        for (t, word) in schedule.iter_mut().enumerate() {
            // SAFETY: `block` holds LANES words from `t * LANES` on, for t < 16 (unaligned load).
            *word = unsafe { _mm256_loadu_si256(block[t * LANES..].as_ptr() as *const __m256i) };
        }
        let [mut a, mut b, mut c, mut d, mut e, mut f, mut g, mut h] = *state;
        for (t, constant) in ROUND_CONSTANTS.iter().enumerate() {
            if t >= 16 {
                schedule[t % 16] = next_schedule_word(&schedule, t);
            }
            let sigma1 = xor3(ror::<14, 50>(e), ror::<18, 46>(e), ror::<41, 23>(e));
            let choose = _mm256_xor_si256(_mm256_and_si256(e, f), _mm256_andnot_si256(e, g));
            let t1 = _mm256_add_epi64(
                _mm256_add_epi64(h, sigma1),
                _mm256_add_epi64(choose, _mm256_add_epi64(_mm256_set1_epi64x(*constant as i64), schedule[t % 16])),
            );
            let sigma0 = xor3(ror::<28, 36>(a), ror::<34, 30>(a), ror::<39, 25>(a));
            let majority = _mm256_or_si256(_mm256_and_si256(a, b), _mm256_and_si256(c, _mm256_or_si256(a, b)));
            let t2 = _mm256_add_epi64(sigma0, majority);
            h = g;
            g = f;
            f = e;
            e = _mm256_add_epi64(d, t1);
            d = c;
            c = b;
            b = a;
            a = _mm256_add_epi64(t1, t2);
        }
        let bit = |lane: u8| if active & (1 << lane) != 0 { -1 } else { 0 };
        let keep_new = _mm256_set_epi64x(bit(3), bit(2), bit(1), bit(0));
        for (word, working) in state.iter_mut().zip([a, b, c, d, e, f, g, h]) {
            *word = _mm256_blendv_epi8(*word, _mm256_add_epi64(*word, working), keep_new);
        }
    }

    /// `W[t] = σ1(W[t-2]) + W[t-7] + σ0(W[t-15]) + W[t-16]`, with the last sixteen kept in a ring.
    #[target_feature(enable = "avx2")]
    fn next_schedule_word(schedule: &[__m256i; 16], t: usize) -> __m256i {
        let (w2, w7, w15, w16) =
            (schedule[(t - 2) % 16], schedule[(t - 7) % 16], schedule[(t - 15) % 16], schedule[t % 16]);
        let small_sigma0 = xor3(ror::<1, 63>(w15), ror::<8, 56>(w15), _mm256_srli_epi64::<7>(w15));
        let small_sigma1 = xor3(ror::<19, 45>(w2), ror::<61, 3>(w2), _mm256_srli_epi64::<6>(w2));
        _mm256_add_epi64(_mm256_add_epi64(small_sigma1, w7), _mm256_add_epi64(small_sigma0, w16))
    }

    /// Rotates each lane right by `RIGHT` bits (`LEFT` is `64 - RIGHT`; AVX2 has no rotate).
    #[target_feature(enable = "avx2")]
    fn ror<const RIGHT: i32, const LEFT: i32>(x: __m256i) -> __m256i {
        debug_assert_eq!(RIGHT + LEFT, 64);
        _mm256_or_si256(_mm256_srli_epi64::<RIGHT>(x), _mm256_slli_epi64::<LEFT>(x))
    }

    #[target_feature(enable = "avx2")]
    fn xor3(a: __m256i, b: __m256i, c: __m256i) -> __m256i {
        _mm256_xor_si256(_mm256_xor_si256(a, b), c)
    }
}

#[cfg(test)]
mod tests {
    use crate::keys::parallel_sha512::*;

    fn bytes(length: usize, seed: usize) -> Vec<u8> {
        (0..length).map(|i| (i * 131 + seed * 17 + 5) as u8).collect()
    }

    fn hex(digest: &[u8; 64]) -> String {
        digest.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Every kernel this CPU can run (each is tested on its own, not only the one
    /// [`Kernel::detect`] picks), then `None`: the sha2 crate alone.
    fn kernels_here() -> Vec<Option<Kernel>> {
        let mut kernels = Vec::new();
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512f") {
                kernels.push(Some(Kernel::Avx512));
            }
            if std::arch::is_x86_feature_detected!("avx2") {
                kernels.push(Some(Kernel::Avx2));
            }
        }
        kernels.push(None);
        kernels
    }

    /// The two SHA-512 examples of FIPS 180-4 (NIST's "abc" and 896-bit messages), in a group
    /// large enough for every kernel, split into parts at odd places.
    #[test]
    fn fips_examples() {
        let abc = "ddaf35a193617abacc417349ae20413112e6fa4e89a97ea20a9eeee64b55d39a2192992a274fc1a836ba3c23a3feebbd454d4423643ce80e2a9ac94fa54ca49f";
        let long = "8e959b75dae313da8cf4f72814fc143f8f7779c6eb9f7fa17299aeadb6889018501d289e4900f7e4331b99dec4b5433ac7d329eeb6dd26545e96e55b874be909";
        let long_message = b"abcdefghbcdefghicdefghijdefghijkefghijklfghijklmghijklmnhijklmnoijklmnopjklmnopqklmnopqrlmnopqrsmnopqrstnopqrstu";
        let mut messages: Vec<[&[u8]; 3]> = Vec::new();
        for _ in 0..4 {
            messages.push([b"a", b"", b"bc"]);
            messages.push([&long_message[..50], &long_message[50..51], &long_message[51..]]);
        }
        for kernel in kernels_here() {
            let digests = sha512_each_with(kernel, &messages);
            for (i, digest) in digests.iter().enumerate() {
                assert_eq!(hex(digest), if i % 2 == 0 { abc } else { long }, "{kernel:?}, message {i}");
            }
        }
    }

    /// Every padding case (the length ending a block, the 0x80 byte alone in the last block,
    /// lengths that need one block more than their neighbours), in groups of every size, with
    /// lanes of different lengths side by side, against the sha2 crate, for every kernel.
    #[test]
    fn matches_sha2_for_every_length_class_and_group_size() {
        let lengths = [0usize, 1, 63, 64, 111, 112, 113, 127, 128, 129, 239, 240, 256, 1_000, 4_097];
        for kernel in kernels_here() {
            for group_size in [1, 2, 3, 4, 5, 8, 9, 16, 17] {
                for (n, &base) in lengths.iter().enumerate() {
                    let bodies: Vec<Vec<u8>> = (0..group_size).map(|i| bytes(base + (i * 7) % 19, n + i)).collect();
                    let head = bytes(64, n);
                    let messages: Vec<[&[u8]; 3]> = bodies
                        .iter()
                        .map(|body| [&head[..], &body[..body.len() / 3], &body[body.len() / 3..]])
                        .collect();
                    let digests = sha512_each_with(kernel, &messages);
                    assert_eq!(digests.len(), group_size);
                    for (message, digest) in messages.iter().zip(&digests) {
                        assert_eq!(*digest, sha512_one(message), "{kernel:?}: group of {group_size}, length {base}");
                    }
                }
            }
        }
    }

    /// Each kernel called directly, with every lane busy and with lanes ending at different
    /// blocks (so the lanes that finished must keep their state): the comparisons above cannot
    /// have fallen back to the sha2 crate unnoticed. On x86_64 at least AVX2 is expected.
    #[test]
    fn each_kernel_this_cpu_has_hashes_by_itself() {
        let kernels: Vec<Kernel> = kernels_here().into_iter().flatten().collect();
        #[cfg(target_arch = "x86_64")]
        assert!(!kernels.is_empty(), "an x86_64 CPU without AVX2 (the tests would test only sha2)");
        assert_eq!(Kernel::detect(), kernels.first().copied());
        for kernel in kernels {
            let messages: Vec<Vec<u8>> = (0..kernel.lanes()).map(|lane| bytes(100 + lane * 300, lane)).collect();
            let group: Vec<[&[u8]; 1]> = messages.iter().map(|m| [&m[..]]).collect();
            #[cfg(target_arch = "x86_64")]
            // SAFETY: the kernel was detected on this CPU.
            let digests = unsafe { kernel.hash_group(&group) };
            #[cfg(not(target_arch = "x86_64"))]
            let digests: Vec<[u8; 64]> = Vec::new();
            assert_eq!(digests.len(), kernel.lanes());
            for (message, digest) in group.iter().zip(&digests) {
                assert_eq!(*digest, sha512_one(message), "{kernel:?}");
            }
        }
    }
}
