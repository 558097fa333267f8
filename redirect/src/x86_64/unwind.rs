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

use gimli::write::{
    Address, CallFrameInstruction, CommonInformationEntry, EhFrame, EndianVec,
    FrameDescriptionEntry, FrameTable,
};
use gimli::{Encoding, Format, LittleEndian, X86_64};
use iced_x86::{Code, Instruction, Mnemonic, OpKind, Register};

use crate::error::{Error, Result};

extern "C" {
    fn __register_frame(begin: *const u8);
    fn __deregister_frame(begin: *const u8);
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
    pub fn new(ranges: &[Range]) -> Result<Registered> {
        let image = build(ranges)?.into_boxed_slice();
        // SAFETY: `image` is a complete .eh_frame section (CIE, FDEs, zero terminator) that
        // stays alive and unmoved (boxed) until it is deregistered in `drop`.
        unsafe { __register_frame(image.as_ptr()) };
        Ok(Registered { image })
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

/// Builds the `.eh_frame` bytes (with `gimli::write`): one CIE with the rule that holds at
/// function entry (CFA = rsp+8, return address at CFA-8), one FDE per range with its
/// steps, and the zero terminator `__register_frame` needs.
pub fn build(ranges: &[Range]) -> Result<Vec<u8>> {
    let encoding = Encoding {
        format: Format::Dwarf32,
        version: 1,
        address_size: 8,
    };
    let mut cie = CommonInformationEntry::new(encoding, 1, -8, X86_64::RA);
    cie.add_instruction(CallFrameInstruction::Cfa(X86_64::RSP, 8));
    cie.add_instruction(CallFrameInstruction::Offset(X86_64::RA, -8));
    let mut table = FrameTable::default();
    let cie = table.add_cie(cie);
    for r in ranges {
        let len = u32::try_from(r.len).map_err(|_| unwind_error(r.start, "range too long"))?;
        let mut fde = FrameDescriptionEntry::new(Address::Constant(r.start), len);
        for &(offset, cfa, saved) in &r.steps {
            if offset >= r.len {
                break;
            }
            // `offset < r.len <= u32::MAX`.
            let at = offset as u32;
            if cfa == 0 {
                fde.add_instruction(at, CallFrameInstruction::Undefined(X86_64::RA));
                break;
            }
            let cfa = i32::try_from(cfa).map_err(|_| unwind_error(r.start, "CFA offset"))?;
            fde.add_instruction(at, CallFrameInstruction::CfaOffset(cfa));
            if let Some((reg, slot)) = saved {
                let slot = i32::try_from(slot).map_err(|_| unwind_error(r.start, "slot"))?;
                let reg = gimli::Register(u16::from(reg));
                fde.add_instruction(at, CallFrameInstruction::Offset(reg, -slot));
            }
        }
        table.add_fde(cie, fde);
    }
    let mut eh = EhFrame(EndianVec::new(LittleEndian));
    table
        .write_eh_frame(&mut eh)
        .map_err(|e| unwind_error(ranges.first().map_or(0, |r| r.start), &e.to_string()))?;
    let mut out = eh.0.into_vec();
    out.extend_from_slice(&[0; 4]);
    Ok(out)
}

fn unwind_error(entry: u64, what: &str) -> Error {
    Error::Encode {
        entry,
        message: format!("cannot encode unwind information: {what}"),
    }
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

    /// The rule row `.eh_frame` image `img` gives for `pc`, as a reader (gimli) sees it.
    fn row(img: &[u8], pc: u64) -> Option<gimli::UnwindTableRow<usize>> {
        use gimli::UnwindSection;
        let eh = gimli::EhFrame::new(img, LittleEndian);
        let mut ctx = gimli::UnwindContext::new();
        eh.unwind_info_for_address(
            &gimli::BaseAddresses::default(),
            &mut ctx,
            pc,
            gimli::EhFrame::cie_from_offset,
        )
        .ok()
        .cloned()
    }

    #[test]
    fn image_describes_each_step() {
        use gimli::{CfaRule, RegisterRule};
        let img = build(&[
            Range {
                start: 0x1000,
                len: 32,
                steps: vec![(1, 16, Some((6, 16))), (3, 24, None), (9, 0, None)],
            },
            Range {
                start: 0x2000,
                len: 300,
                steps: vec![(280, 16, Some((12, 16)))],
            },
        ])
        .unwrap();
        assert_eq!(&img[img.len() - 4..], &[0, 0, 0, 0], "zero terminator");
        let cfa = |pc| match row(&img, pc).unwrap().cfa() {
            CfaRule::RegisterAndOffset { register, offset } => {
                assert_eq!(*register, X86_64::RSP);
                *offset
            }
            other => panic!("{other:?}"),
        };
        let rule = |pc, reg| row(&img, pc).unwrap().register(reg);
        assert_eq!(cfa(0x1000), 8);
        assert_eq!(rule(0x1000, X86_64::RA), RegisterRule::Offset(-8));
        assert_eq!(rule(0x1000, X86_64::RBP), RegisterRule::Undefined);
        assert_eq!(cfa(0x1001), 16);
        assert_eq!(rule(0x1002, X86_64::RBP), RegisterRule::Offset(-16));
        assert_eq!(cfa(0x1003), 24);
        assert_eq!(rule(0x1008, X86_64::RBP), RegisterRule::Offset(-16));
        assert_eq!(rule(0x1009, X86_64::RA), RegisterRule::Undefined);
        assert_eq!(rule(0x101f, X86_64::RA), RegisterRule::Undefined);
        assert!(row(&img, 0x1020).is_none(), "past the range");
        // An advance beyond one byte's reach.
        assert_eq!(cfa(0x2000 + 279), 8);
        assert_eq!(cfa(0x2000 + 280), 16);
        assert_eq!(rule(0x2000 + 299, X86_64::R12), RegisterRule::Offset(-16));
    }
}
