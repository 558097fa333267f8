//! Unwind information for stubs and trampolines, registered with the process's unwinder
//! (libgcc's `__register_frame`), so that profilers, debuggers, `backtrace()` and crash
//! handlers can walk through a thread interrupted inside one.
//!
//! Nothing in a stub calls or pushes, so "CFA = rsp+8, return address at CFA-8" holds at
//! every one of its instructions. A trampoline replays the overwritten prologue, which may
//! push registers or move rsp: its rules follow the relocated instructions one by one.
//!
//! # Safety
//! `__register_frame` keeps a pointer to the image it is given and reads it whenever
//! something unwinds: [`Registered`] owns the image in a `Box` that never moves or changes,
//! and deregisters it before freeing it. The image is built by [`build`] alone, so it is
//! always a complete, zero-terminated `.eh_frame`.
#![allow(unsafe_code)]

use iced_x86::{Code, Instruction, Mnemonic, OpKind, Register};

extern "C" {
    fn __register_frame(begin: *const u8);
    fn __deregister_frame(begin: *const u8);
}

const DW_CFA_NOP: u8 = 0x00;
const DW_CFA_DEF_CFA: u8 = 0x0c;
const DW_CFA_DEF_CFA_OFFSET: u8 = 0x0e;
const DW_CFA_ADVANCE_LOC1: u8 = 0x02;
const DW_CFA_UNDEFINED: u8 = 0x07;
const RSP: u8 = 7;
const RIP: u8 = 16;

fn uleb(out: &mut Vec<u8>, mut v: u64) {
    loop {
        let byte = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}

fn pad8(out: &mut Vec<u8>, start: usize) {
    while (out.len() - start) % 8 != 0 {
        out.push(DW_CFA_NOP);
    }
}

fn dwarf_reg(r: Register) -> Option<u8> {
    Some(match r.full_register() {
        Register::RAX => 0,
        Register::RDX => 1,
        Register::RCX => 2,
        Register::RBX => 3,
        Register::RSI => 4,
        Register::RDI => 5,
        Register::RBP => 6,
        Register::R8 => 8,
        Register::R9 => 9,
        Register::R10 => 10,
        Register::R11 => 11,
        Register::R12 => 12,
        Register::R13 => 13,
        Register::R14 => 14,
        Register::R15 => 15,
        _ => return None,
    })
}

/// A CFA rule change: at `.0` (offset in the range), CFA = rsp + `.1` (0: unknown from
/// there on); optionally register `.2.0` saved at CFA - `.2.1`.
pub type Step = (u64, u64, Option<(u8, u64)>);

/// One code range and the CFA rule changes inside it: `(offset, cfa offset from rsp, saved
/// register and its CFA-relative slot)`.
#[derive(Debug, Clone)]
pub struct Range {
    /// Start address.
    pub start: u64,
    /// Length in bytes.
    pub len: u64,
    /// Rule changes: at `offset`, CFA = rsp + `cfa`; optionally `reg` saved at CFA - `slot`.
    /// `cfa == 0` means the rule is unknown from there on.
    pub steps: Vec<Step>,
}

/// The CFA steps of a trampoline whose relocated instructions are `ins` at trampoline
/// offsets `offsets` (one more offset than instructions: the jump back).
pub fn trampoline_steps(ins: &[Instruction], offsets: &[u64]) -> Vec<Step> {
    let mut cfa = 8u64;
    let mut steps = Vec::new();
    for (i, ins) in ins.iter().enumerate() {
        let next = offsets[i + 1];
        let mut saved = None;
        let known = match (ins.mnemonic(), ins.op0_kind()) {
            (Mnemonic::Push, OpKind::Register) if ins.op0_register().size() == 8 => {
                cfa += 8;
                saved = dwarf_reg(ins.op0_register()).map(|r| (r, cfa));
                true
            }
            (Mnemonic::Sub | Mnemonic::Add, OpKind::Register)
                if ins.op0_register() == Register::RSP
                    && matches!(
                        ins.op1_kind(),
                        OpKind::Immediate8to64 | OpKind::Immediate32to64
                    ) =>
            {
                let imm = ins.immediate(1) as i64;
                let delta = if ins.mnemonic() == Mnemonic::Sub {
                    imm
                } else {
                    -imm
                };
                cfa = (cfa as i64 + delta) as u64;
                true
            }
            _ if ins.stack_pointer_increment() != 0 => {
                cfa = (cfa as i64 - ins.stack_pointer_increment() as i64) as u64;
                true
            }
            _ => {
                // Any other write to rsp leaves the rule unknown.
                !(ins.op_count() > 0
                    && ins.op0_kind() == OpKind::Register
                    && ins.op0_register().full_register() == Register::RSP
                    && ins.code() != Code::Cmp_rm64_r64)
            }
        };
        if !known {
            steps.push((next, 0, None));
            break;
        }
        steps.push((next, cfa, saved));
    }
    steps
}

/// A registered `.eh_frame` image. Deregistered when dropped: drop it only once no thread
/// can be inside the ranges it describes.
#[derive(Debug)]
pub struct Registered {
    image: Box<[u8]>,
}

impl Registered {
    /// Builds an `.eh_frame` image (one CIE, one FDE per range) and registers it.
    pub fn new(ranges: &[Range]) -> Registered {
        let image = build(ranges).into_boxed_slice();
        // SAFETY: `image` is a complete .eh_frame section (CIE, FDEs, zero terminator) that
        // stays alive and unmoved (boxed) until it is deregistered in `drop`.
        unsafe { __register_frame(image.as_ptr()) };
        Registered { image }
    }

    /// The bytes, for tests.
    pub fn image(&self) -> &[u8] {
        &self.image
    }
}

impl Drop for Registered {
    fn drop(&mut self) {
        // SAFETY: the same pointer was registered in `new` and is still alive.
        unsafe { __deregister_frame(self.image.as_ptr()) };
    }
}

/// Builds the `.eh_frame` bytes.
pub fn build(ranges: &[Range]) -> Vec<u8> {
    let mut out = Vec::new();
    // CIE.
    let cie = out.len();
    out.extend_from_slice(&[0; 4]); // length
    out.extend_from_slice(&0u32.to_le_bytes()); // CIE id
    out.push(1); // version
    out.extend_from_slice(b"zR\0");
    uleb(&mut out, 1); // code alignment
    out.push(0x78); // data alignment -8 (SLEB128)
    uleb(&mut out, RIP as u64); // return address register
    uleb(&mut out, 1); // augmentation data length
    out.push(0x00); // FDE pointers: DW_EH_PE_absptr
    out.extend_from_slice(&[DW_CFA_DEF_CFA, RSP, 8]);
    out.extend_from_slice(&[0x80 | RIP, 1]); // rip at CFA-8
    pad8(&mut out, cie);
    let len = (out.len() - cie - 4) as u32;
    out[cie..cie + 4].copy_from_slice(&len.to_le_bytes());

    for r in ranges {
        let fde = out.len();
        out.extend_from_slice(&[0; 4]);
        let cie_ptr = (out.len() - cie) as u32;
        out.extend_from_slice(&cie_ptr.to_le_bytes());
        out.extend_from_slice(&r.start.to_le_bytes());
        out.extend_from_slice(&r.len.to_le_bytes());
        uleb(&mut out, 0); // augmentation data length
        let mut at = 0u64;
        for &(offset, cfa, saved) in &r.steps {
            if offset >= r.len {
                break;
            }
            if offset > at {
                let delta = offset - at;
                if delta < 64 {
                    out.push(0x40 | delta as u8);
                } else {
                    out.push(DW_CFA_ADVANCE_LOC1);
                    out.push(delta.min(255) as u8);
                }
                at = offset;
            }
            if cfa == 0 {
                out.extend_from_slice(&[DW_CFA_UNDEFINED, RIP]);
                break;
            }
            out.push(DW_CFA_DEF_CFA_OFFSET);
            uleb(&mut out, cfa);
            if let Some((reg, slot)) = saved {
                out.push(0x80 | reg);
                uleb(&mut out, slot / 8);
            }
        }
        pad8(&mut out, fde);
        let len = (out.len() - fde - 4) as u32;
        out[fde..fde + 4].copy_from_slice(&len.to_le_bytes());
    }
    out.extend_from_slice(&[0; 4]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use iced_x86::{Decoder, DecoderOptions};

    #[test]
    fn pushes_move_the_cfa() {
        // push rbp; push r12; sub rsp, 0x18
        let bytes = [0x55, 0x41, 0x54, 0x48, 0x83, 0xec, 0x18];
        let mut d = Decoder::with_ip(64, &bytes, 0, DecoderOptions::NONE);
        let ins: Vec<_> = std::iter::from_fn(|| d.can_decode().then(|| d.decode())).collect();
        let steps = trampoline_steps(&ins, &[0, 1, 3, 7]);
        assert_eq!(
            steps,
            vec![
                (1, 16, Some((6, 16))),
                (3, 24, Some((12, 24))),
                (7, 48, None)
            ]
        );
    }

    #[test]
    fn image_is_well_formed() {
        let img = build(&[Range {
            start: 0x1000,
            len: 32,
            steps: vec![(1, 16, Some((6, 16)))],
        }]);
        let cie_len = u32::from_le_bytes(img[0..4].try_into().unwrap()) as usize;
        assert_eq!((cie_len + 4) % 8, 0);
        let fde = cie_len + 4;
        let fde_len = u32::from_le_bytes(img[fde..fde + 4].try_into().unwrap()) as usize;
        let cie_ptr = u32::from_le_bytes(img[fde + 4..fde + 8].try_into().unwrap()) as usize;
        assert_eq!(cie_ptr, fde + 4);
        assert_eq!(
            u64::from_le_bytes(img[fde + 8..fde + 16].try_into().unwrap()),
            0x1000
        );
        assert_eq!(&img[fde + 4 + fde_len..], &[0, 0, 0, 0]);
        // advance 1; def_cfa_offset 16; rbp at cfa-16
        assert_eq!(&img[fde + 25..fde + 30], &[0x41, 0x0e, 16, 0x86, 2]);
    }
}
