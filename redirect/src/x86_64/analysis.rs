//! Deciding where a function's patch site goes, and refusing functions that cannot hold one.
//!
//! The function is decoded whole. The *patch point* is its entry, or the byte after an
//! `endbr64` there (which stays, so indirect calls keep working under CET). The site jump is
//! a 5-byte `jmp rel32` at the patch point; when the function has a NOP pad of at least 5
//! single-byte NOPs right before its entry (`-fpatchable-function-entry=N,M`), the 5-byte
//! jump goes in the pad and the patch point gets a 2-byte `jmp rel8` to it. The whole
//! instructions covering the jump's bytes are the *overwritten* instructions; they are
//! relocated into a trampoline for the original version.
//!
//! **Padding after a short function.** A function shorter than the jump (`mov eax, edi; ret`)
//! can still hold it when the caller passes, as its size, the distance to the next symbol or
//! the section's end, and the bytes there are provably padding: the function's first
//! unconditional exit (`ret`, `jmp`) is followed, up to the end of the bytes given, only by
//! NOPs and `int3`, and no instruction before it branches into them. Nothing executes
//! padding, so the jump may overwrite it (the trampoline copies it, unreachable after the
//! exit). Otherwise the overwritten bytes may not reach past that first exit: bytes after an
//! exit that only an indirect jump could reach are never overwritten.

use iced_x86::{
    Decoder, DecoderOptions, FlowControl, Formatter, Instruction, IntelFormatter, Mnemonic,
};

use crate::error::Refusal;

/// Whether to put the site jump in a patchable-entry NOP pad.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PadHint {
    /// Use a pad of at least 5 single-byte NOPs right before the entry, if there is one.
    #[default]
    Auto,
    /// Never use a pad, even if one is found.
    Never,
    /// The function was built with `-fpatchable-function-entry=N,M` (M >= 5): refuse if no
    /// pad is found.
    Required,
}

/// Size of the site's long jump (`jmp rel32`).
pub const JMP32_LEN: usize = 5;
/// Size of the entry jump into a pad (`jmp rel8`).
pub const JMP8_LEN: usize = 2;
const ENDBR64: [u8; 4] = [0xF3, 0x0F, 0x1E, 0xFA];

/// Where a function's patch site goes, and what it overwrites.
#[derive(Debug, Clone)]
pub struct SiteAnalysis {
    pub(crate) entry: u64,
    pub(crate) size: u64,
    pub(crate) patch_point: u64,
    pub(crate) endbr: bool,
    pub(crate) pad_jump: Option<u64>,
    pub(crate) jump_len: usize,
    pub(crate) original: Vec<u8>,
    pub(crate) pad_original: Vec<u8>,
    pub(crate) instructions: Vec<Instruction>,
    pub(crate) reach: Vec<u64>,
    pub(crate) padding: u64,
}

impl SiteAnalysis {
    /// The function's entry.
    pub fn entry(&self) -> u64 {
        self.entry
    }
    /// The function's size.
    pub fn size(&self) -> u64 {
        self.size
    }
    /// Where the site jump starts (the entry, or after its `endbr64`).
    pub fn patch_point(&self) -> u64 {
        self.patch_point
    }
    /// `true` if the entry holds an `endbr64` that stays.
    pub fn has_endbr(&self) -> bool {
        self.endbr
    }
    /// Address of the 5-byte jump in the patchable-entry pad, when one is used.
    pub fn pad_jump(&self) -> Option<u64> {
        self.pad_jump
    }
    /// Bytes of the jump written at the patch point (5, or 2 with a pad).
    pub fn jump_len(&self) -> usize {
        self.jump_len
    }
    /// The original bytes of the overwritten instructions.
    pub fn original_bytes(&self) -> &[u8] {
        &self.original
    }
    /// Offsets (from the patch point) of the overwritten instructions.
    pub fn instruction_offsets(&self) -> Vec<u64> {
        self.instructions
            .iter()
            .map(|i| i.ip() - self.patch_point)
            .collect()
    }
    /// The overwritten instructions as (address, Intel-syntax text), for `describe`-style
    /// output.
    pub fn overwritten_disassembly(&self) -> Vec<(u64, String)> {
        self.instructions
            .iter()
            .map(|i| (i.ip(), text(i)))
            .collect()
    }

    /// Bytes of padding after the function's last instruction that the site overwrites (0
    /// unless the function is shorter than the jump; see the module docs).
    pub fn padding_overwritten(&self) -> u64 {
        self.padding
    }

    /// Addresses a trampoline for this site must reach with 32-bit displacements.
    pub fn reach(&self) -> &[u64] {
        &self.reach
    }
}

fn text(i: &Instruction) -> String {
    let mut out = String::new();
    IntelFormatter::new().format(i, &mut out);
    out
}

/// Analyses the function at `entry` whose bytes are `code`: its whole body (`code.len()` is
/// its size), optionally followed by the bytes up to the next symbol or the end of its
/// section (its alignment padding; see the module docs). `before` holds the bytes right
/// before the entry (any length, may be empty), for pad detection.
pub fn analyze_bytes(
    entry: u64,
    code: &[u8],
    before: &[u8],
    pad: PadHint,
) -> Result<SiteAnalysis, Refusal> {
    let size = code.len() as u64;
    let endbr = code.starts_with(&ENDBR64);
    let skip = if endbr { ENDBR64.len() } else { 0 };
    let patch_point = entry + skip as u64;
    let pad_nops = before.iter().rev().take_while(|&&b| b == 0x90).count();
    let pad_jump = match pad {
        PadHint::Never => None,
        _ if pad_nops >= JMP32_LEN => Some(entry - JMP32_LEN as u64),
        PadHint::Required => return Err(Refusal::NoPad { entry }),
        PadHint::Auto => None,
    };
    let jump_len = if pad_jump.is_some() {
        JMP8_LEN
    } else {
        JMP32_LEN
    };
    let needed = (skip + jump_len) as u64;
    if size < needed {
        return Err(Refusal::TooShort {
            entry,
            size,
            needed,
        });
    }

    // Decode the whole function.
    let mut decoder = Decoder::with_ip(64, code, entry, DecoderOptions::NONE);
    let mut all = Vec::new();
    while decoder.can_decode() {
        all.push(decoder.decode());
    }
    let exit = first_exit(&all);
    let padding_ok = exit.is_some_and(|e| is_padding(&all, e, entry + size));

    // The overwritten instructions: whole instructions from the patch point covering the jump.
    let mut instructions = Vec::new();
    let mut covered = 0usize;
    let start = all.iter().position(|i| i.ip() == patch_point);
    let Some(start) = start else {
        return Err(Refusal::Undecodable { ip: patch_point });
    };
    for ins in &all[start..] {
        if covered >= jump_len {
            break;
        }
        if let Some(e) = exit.filter(|&e| ins.ip() >= e && !padding_ok) {
            // Past the function's first exit, with no provable padding there.
            return Err(Refusal::TooShort {
                entry,
                size: e - entry,
                needed,
            });
        }
        if ins.is_invalid() {
            return Err(Refusal::Undecodable { ip: ins.ip() });
        }
        covered += ins.len();
        instructions.push(*ins);
    }
    if covered < jump_len || patch_point + covered as u64 > entry + size {
        return Err(Refusal::TooShort {
            entry,
            size,
            needed,
        });
    }
    let first = &instructions[0];
    if matches!(first.mnemonic(), Mnemonic::Jmp | Mnemonic::Int3) {
        return Err(Refusal::ForeignPatch {
            entry,
            text: text(first),
        });
    }

    let in_padding = |ins: &Instruction| padding_ok && exit.is_some_and(|e| ins.ip() >= e);
    let mut reach = vec![patch_point, patch_point + covered as u64];
    for ins in &instructions {
        if in_padding(ins) {
            // Never executed (after the exit, no branch into it): copied as it is.
            continue;
        }
        let why = match ins.flow_control() {
            FlowControl::Call | FlowControl::IndirectCall if ins.mnemonic() != Mnemonic::Syscall => {
                Some("a call pushes a return address into the trampoline, which unwinders and returns cannot follow")
            }
            FlowControl::Interrupt if ins.mnemonic() != Mnemonic::Syscall => {
                Some("an interrupt or breakpoint instruction cannot be moved")
            }
            FlowControl::XbeginXabortXend => Some("a transactional-memory instruction cannot be moved"),
            FlowControl::Exception => Some("an instruction that always faults cannot be moved"),
            _ => None,
        };
        if let Some(why) = why {
            return Err(Refusal::NotRelocatable {
                ip: ins.ip(),
                text: text(ins),
                why,
            });
        }
        if ins.is_ip_rel_memory_operand() {
            reach.push(ins.ip_rel_memory_address());
        }
        let target = ins.near_branch_target();
        if target != 0 {
            reach.push(target);
        }
    }

    // No branch may land inside the overwritten bytes, except at their start.
    let inside = patch_point + 1..patch_point + covered as u64;
    for ins in &all {
        let target = ins.near_branch_target();
        if target != 0 && inside.contains(&target) {
            return Err(Refusal::BranchIntoSite {
                from: ins.ip(),
                target,
            });
        }
    }

    let padding = instructions
        .iter()
        .filter(|i| in_padding(i))
        .map(|i| i.len() as u64)
        .sum();
    let original = code[skip..skip + covered].to_vec();
    let pad_original = if pad_jump.is_some() {
        before[before.len() - JMP32_LEN..].to_vec()
    } else {
        Vec::new()
    };
    Ok(SiteAnalysis {
        entry,
        size,
        patch_point,
        endbr,
        pad_jump,
        jump_len,
        original,
        pad_original,
        instructions,
        reach,
        padding,
    })
}

/// The end of the first unconditional exit (`ret`, `jmp`, indirect `jmp`) among `all`:
/// execution never falls through past it.
fn first_exit(all: &[Instruction]) -> Option<u64> {
    all.iter()
        .find(|i| {
            !i.is_invalid()
                && matches!(
                    i.flow_control(),
                    FlowControl::Return
                        | FlowControl::UnconditionalBranch
                        | FlowControl::IndirectBranch
                )
        })
        .map(|i| i.next_ip())
}

/// `true` if the bytes `[from, end)` are padding: they decode exactly to `end` as NOPs and
/// `int3` only, and no instruction before `from` branches into them.
fn is_padding(all: &[Instruction], from: u64, end: u64) -> bool {
    let tail: Vec<&Instruction> = all.iter().filter(|i| i.ip() >= from).collect();
    let fill = tail
        .iter()
        .all(|i| !i.is_invalid() && matches!(i.mnemonic(), Mnemonic::Nop | Mnemonic::Int3));
    let exact = tail.last().map_or(from == end, |i| i.next_ip() == end);
    let entered = all
        .iter()
        .filter(|i| i.ip() < from)
        .any(|i| (from..end).contains(&i.near_branch_target()));
    from < end && fill && exact && !entered
}

#[cfg(test)]
mod tests {
    use super::*;

    const AT: u64 = 0x40_0000;

    #[test]
    fn push_prologue_covers_three_instructions() {
        // push rbp; push rbx; push r12; mov eax, edi; pop r12; pop rbx; pop rbp; ret
        let code = [
            0x55, 0x53, 0x41, 0x54, 0x89, 0xf8, 0x41, 0x5c, 0x5b, 0x5d, 0xc3,
        ];
        let a = analyze_bytes(AT, &code, &[], PadHint::Auto).unwrap();
        assert_eq!(a.patch_point(), AT);
        assert_eq!(a.instruction_offsets(), vec![0, 1, 2, 4]);
        assert_eq!(a.original_bytes(), &code[..6]);
        assert_eq!(a.jump_len(), 5);
        let text: Vec<String> = a
            .overwritten_disassembly()
            .into_iter()
            .map(|(_, t)| t)
            .collect();
        assert_eq!(text, ["push rbp", "push rbx", "push r12", "mov eax,edi"]);
    }

    #[test]
    fn endbr_stays_and_site_follows_it() {
        // endbr64; push rbp; mov rbp, rsp; mov eax, edi; pop rbp; ret
        let code = [
            0xf3, 0x0f, 0x1e, 0xfa, 0x55, 0x48, 0x89, 0xe5, 0x89, 0xf8, 0x5d, 0xc3,
        ];
        let a = analyze_bytes(AT, &code, &[], PadHint::Auto).unwrap();
        assert!(a.has_endbr());
        assert_eq!(a.patch_point(), AT + 4);
        assert_eq!(a.instruction_offsets(), vec![0, 1, 4]);
    }

    #[test]
    fn pad_gets_the_long_jump() {
        // 14 nops before; nop; nop; lea eax, [rdi+1]; ret
        let before = [0x90; 14];
        let code = [0x90, 0x90, 0x8d, 0x47, 0x01, 0xc3];
        let a = analyze_bytes(AT, &code, &before, PadHint::Auto).unwrap();
        assert_eq!(a.pad_jump(), Some(AT - 5));
        assert_eq!(a.jump_len(), 2);
        assert_eq!(a.instruction_offsets(), vec![0, 1]);
        let no = analyze_bytes(AT, &code, &before, PadHint::Never).unwrap();
        assert_eq!(no.pad_jump(), None);
        assert_eq!(
            analyze_bytes(AT, &code, &[0x90; 4], PadHint::Required).unwrap_err(),
            Refusal::NoPad { entry: AT }
        );
    }

    #[test]
    fn tiny_function_is_refused() {
        // lea eax, [rdi+1]; ret
        let code = [0x8d, 0x47, 0x01, 0xc3];
        assert!(matches!(
            analyze_bytes(AT, &code, &[], PadHint::Auto),
            Err(Refusal::TooShort { needed: 5, .. })
        ));
    }

    #[test]
    fn branch_into_prologue_is_refused() {
        // 0: push rbx; 1: mov ebx, edi; 3: dec ebx; 5: jne 1; 7: pop rbx; 8: ret
        let code = [0x53, 0x89, 0xfb, 0xff, 0xcb, 0x75, 0xfa, 0x5b, 0xc3];
        assert_eq!(
            analyze_bytes(AT, &code, &[], PadHint::Auto).unwrap_err(),
            Refusal::BranchIntoSite {
                from: AT + 5,
                target: AT + 1
            }
        );
    }

    #[test]
    fn call_in_prologue_is_refused() {
        // call +0; ret ...
        let code = [0xe8, 0, 0, 0, 0, 0xc3, 0x90, 0x90];
        assert!(matches!(
            analyze_bytes(AT, &code, &[], PadHint::Auto),
            Err(Refusal::NotRelocatable { ip: AT, .. })
        ));
    }

    #[test]
    fn entry_jump_or_int3_is_refused() {
        let jmp = [0xe9, 0, 0, 0, 0, 0xc3];
        assert!(matches!(
            analyze_bytes(AT, &jmp, &[], PadHint::Auto),
            Err(Refusal::ForeignPatch { .. })
        ));
        let int3 = [0xcc, 0x53, 0x89, 0xfb, 0x5b, 0xc3];
        assert!(matches!(
            analyze_bytes(AT, &int3, &[], PadHint::Auto),
            Err(Refusal::ForeignPatch { .. })
        ));
    }

    #[test]
    fn rip_relative_target_is_reached() {
        // mov rax, [rip+0x100]; ret
        let code = [0x48, 0x8b, 0x05, 0x00, 0x01, 0x00, 0x00, 0xc3];
        let a = analyze_bytes(AT, &code, &[], PadHint::Auto).unwrap();
        assert!(a.reach().contains(&(AT + 7 + 0x100)));
    }

    #[test]
    fn branch_to_the_start_is_allowed() {
        // 0: push rbx; 1: pop rbx; 2: nop3; 5: test edi,edi; 7: jne 0; 9: ret
        let code = [0x53, 0x5b, 0x0f, 0x1f, 0x00, 0x85, 0xff, 0x75, 0xf7, 0xc3];
        analyze_bytes(AT, &code, &[], PadHint::Auto).unwrap();
    }
}
