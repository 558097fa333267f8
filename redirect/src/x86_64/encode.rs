//! Machine code kgpatch generates: trampolines, redirect stubs, and the jumps written at
//! patch sites.

use iced_x86::{
    BlockEncoder, BlockEncoderOptions, Code, IcedError, Instruction, InstructionBlock,
    MemoryOperand, Register,
};
use kgpatch_universe::site_offsets;

/// A trampoline: the relocated overwritten instructions, then a jump back.
#[derive(Debug, Clone)]
pub struct Trampoline {
    /// The code, to be placed at the address it was encoded for.
    pub code: Vec<u8>,
    /// For each overwritten instruction: (offset from the patch point, offset of its copy in
    /// the trampoline).
    pub map: Vec<(u64, u64)>,
    /// Offset of the jump back.
    pub jump_back: u64,
}

/// Relocates `instructions` (decoded at their original addresses) to `at`, followed by a
/// `jmp rel32` to `resume`.
pub fn trampoline(
    instructions: &[Instruction],
    patch_point: u64,
    at: u64,
    resume: u64,
) -> Result<Trampoline, IcedError> {
    let mut block: Vec<Instruction> = instructions.to_vec();
    let mut back = Instruction::with_branch(Code::Jmp_rel32_64, resume)?;
    // Not its would-be address: that is `resume` itself, and the block encoder would take
    // the jump for a branch to an instruction of the block (itself).
    back.set_ip(0);
    block.push(back);
    let result = BlockEncoder::encode(
        64,
        InstructionBlock::new(&block, at),
        BlockEncoderOptions::RETURN_NEW_INSTRUCTION_OFFSETS,
    )?;
    let offsets = &result.new_instruction_offsets;
    let map = instructions
        .iter()
        .zip(offsets)
        .map(|(i, &o)| (i.ip() - patch_point, o as u64))
        .collect();
    Ok(Trampoline {
        code: result.code_buffer,
        map,
        jump_back: offsets[instructions.len()] as u64,
    })
}

fn rip_rel(target: u64) -> MemoryOperand {
    MemoryOperand::new(
        Register::RIP,
        Register::None,
        1,
        target as i64,
        8,
        false,
        Register::None,
    )
}

/// The redirect stub at `at` for the site words at `site`:
///
/// ```text
/// mov   r11, fs:[tls_offset]     ; the thread's universe word
/// cmp   r11, [rip+migrated_value]
/// mov   r11, [rip+from]
/// cmove r11, [rip+to]
/// jmp   r11
/// ```
///
/// Branch-free up to one indirect jump, so threads in `from` and in `to` pay the same. r11
/// is free at a function's entry in the SysV ABI (neither an argument nor callee-saved).
/// The loads happen in `select`'s order (x86 keeps loads in order): `migrated_value`, then
/// the version words.
///
/// The `fs:[disp32]` operand uses `displ_size = 8`: with 4, iced-x86 would emit a 0x67
/// prefix and a zero-extended displacement, and a negative TLS offset would fault.
pub fn stub(at: u64, site: u64, tls_offset: i32) -> Result<Vec<u8>, IcedError> {
    let fs = MemoryOperand::new(
        Register::None,
        Register::None,
        1,
        tls_offset as i64,
        8,
        false,
        Register::FS,
    );
    let block = [
        Instruction::with2(Code::Mov_r64_rm64, Register::R11, fs)?,
        Instruction::with2(
            Code::Cmp_r64_rm64,
            Register::R11,
            rip_rel(site + site_offsets::MIGRATED_VALUE as u64),
        )?,
        Instruction::with2(
            Code::Mov_r64_rm64,
            Register::R11,
            rip_rel(site + site_offsets::FROM as u64),
        )?,
        Instruction::with2(
            Code::Cmove_r64_rm64,
            Register::R11,
            rip_rel(site + site_offsets::TO as u64),
        )?,
        Instruction::with1(Code::Jmp_rm64, Register::R11)?,
    ];
    Ok(BlockEncoder::encode(
        64,
        InstructionBlock::new(&block, at),
        BlockEncoderOptions::NONE,
    )?
    .code_buffer)
}

/// `jmp qword [rip+slot]` at `at`: a jump through a data word (the fast path to a version
/// out of `jmp rel32` reach).
pub fn jmp_through(at: u64, slot: u64) -> Result<Vec<u8>, IcedError> {
    let i = Instruction::with1(Code::Jmp_rm64, rip_rel(slot))?;
    Ok(BlockEncoder::encode(
        64,
        InstructionBlock::new(&[i], at),
        BlockEncoderOptions::NONE,
    )?
    .code_buffer)
}

/// `jmp rel32` from `at` to `target`, if in reach.
pub fn jmp32(at: u64, target: u64) -> Option<[u8; 5]> {
    let rel = i32::try_from(target.wrapping_sub(at + 5) as i64).ok()?;
    let r = rel.to_le_bytes();
    Some([0xE9, r[0], r[1], r[2], r[3]])
}

/// `jmp rel8` from `at` to `target`, if in reach.
pub fn jmp8(at: u64, target: u64) -> Option<[u8; 2]> {
    let rel = i8::try_from(target.wrapping_sub(at + 2) as i64).ok()?;
    Some([0xEB, rel as u8])
}

#[cfg(test)]
mod tests {
    use super::*;
    use iced_x86::{Decoder, DecoderOptions, Formatter, IntelFormatter};

    fn disasm(code: &[u8], ip: u64) -> Vec<String> {
        let mut d = Decoder::with_ip(64, code, ip, DecoderOptions::NONE);
        let mut f = IntelFormatter::new();
        f.options_mut().set_hex_prefix("0x");
        f.options_mut().set_hex_suffix("");
        f.options_mut().set_branch_leading_zeros(false);
        let mut out = Vec::new();
        while d.can_decode() {
            let mut s = String::new();
            f.format(&d.decode(), &mut s);
            out.push(s);
        }
        out
    }

    #[test]
    fn stub_reads_the_negative_tls_offset_sign_extended() {
        let at = 0x7000_0000_0000;
        let site = at + 0x4000;
        let code = stub(at, site, -0x40).unwrap();
        // mov r11, fs:[-0x40] must be the sign-extended disp32 form (no 0x67 prefix).
        assert_eq!(
            &code[..9],
            &[0x64, 0x4c, 0x8b, 0x1c, 0x25, 0xc0, 0xff, 0xff, 0xff]
        );
        let text = disasm(&code, at);
        assert_eq!(
            text,
            vec![
                "mov r11,fs:[0xFFFFFFFFFFFFFFC0]".to_string(),
                format!("cmp r11,[{:#X}]", site),
                format!("mov r11,[{:#X}]", site + 8),
                format!("cmove r11,[{:#X}]", site + 16),
                "jmp r11".to_string(),
            ]
        );
    }

    #[test]
    fn trampoline_relocates_rip_relative_and_maps_offsets() {
        let pp = 0x40_0000u64;
        // push rbx; mov rax, [rip+0x100]
        let bytes = [0x53, 0x48, 0x8b, 0x05, 0x00, 0x01, 0x00, 0x00];
        let mut d = Decoder::with_ip(64, &bytes, pp, DecoderOptions::NONE);
        let ins: Vec<_> = std::iter::from_fn(|| d.can_decode().then(|| d.decode())).collect();
        let at = pp + 0x10_0000;
        let t = trampoline(&ins, pp, at, pp + 8).unwrap();
        assert_eq!(t.map, vec![(0, 0), (1, 1)]);
        let text = disasm(&t.code, at);
        assert_eq!(text[0], "push rbx");
        assert_eq!(text[1], format!("mov rax,[{:#X}]", pp + 8 + 0x100));
        assert_eq!(text[2], format!("jmp {:#X}", pp + 8));
        assert_eq!(t.jump_back, 8);
    }

    #[test]
    fn short_branch_becomes_long() {
        let pp = 0x40_0000u64;
        // jne +0x10 (short), then nop3
        let bytes = [0x75, 0x10, 0x0f, 0x1f, 0x00];
        let mut d = Decoder::with_ip(64, &bytes, pp, DecoderOptions::NONE);
        let ins: Vec<_> = std::iter::from_fn(|| d.can_decode().then(|| d.decode())).collect();
        let at = pp + 0x10_0000;
        let t = trampoline(&ins, pp, at, pp + 5).unwrap();
        let text = disasm(&t.code, at);
        assert_eq!(text[0], format!("jne {:#X}", pp + 2 + 0x10));
        assert_eq!(t.map[1].0, 2);
    }

    #[test]
    fn jumps_encode_and_refuse_out_of_reach() {
        assert_eq!(jmp32(0x1000, 0x1005), Some([0xE9, 0, 0, 0, 0]));
        assert_eq!(jmp32(0x1000, 0x1000), Some([0xE9, 0xFB, 0xFF, 0xFF, 0xFF]));
        assert_eq!(jmp32(0x1000, 0x1_0000_1000), None);
        assert_eq!(jmp8(0x1000, 0x1000 - 11 + 2), Some([0xEB, 0xF5]));
        assert_eq!(jmp8(0x1000, 0x2000), None);
    }
}
