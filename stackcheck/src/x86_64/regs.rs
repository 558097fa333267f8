//! The register context a walk starts from.
//!
//! # Safety
//! [`Regs::from_ucontext`] reads a `ucontext_t` the kernel gave a signal handler; the
//! caller vouches for the pointer. [`capture_caller`] is a small assembly function that
//! writes its caller's registers to a buffer.

#![allow(unsafe_code)]

/// An x86-64 general-purpose register, numbered as DWARF numbers them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
#[allow(missing_docs)]
pub enum Reg {
    Rax = 0,
    Rdx = 1,
    Rcx = 2,
    Rbx = 3,
    Rsi = 4,
    Rdi = 5,
    Rbp = 6,
    Rsp = 7,
    R8 = 8,
    R9 = 9,
    R10 = 10,
    R11 = 11,
    R12 = 12,
    R13 = 13,
    R14 = 14,
    R15 = 15,
    /// The instruction pointer (DWARF's return-address column).
    Rip = 16,
}

core::arch::global_asm!(
    ".pushsection .text.kgpatch_stackcheck_capture_caller,\"ax\",@progbits",
    ".globl kgpatch_stackcheck_capture_caller",
    ".hidden kgpatch_stackcheck_capture_caller",
    ".type kgpatch_stackcheck_capture_caller,@function",
    "kgpatch_stackcheck_capture_caller:",
    ".cfi_startproc",
    "mov rax, [rsp]",
    "mov [rdi], rax",
    "lea rax, [rsp + 8]",
    "mov [rdi + 8], rax",
    "mov [rdi + 16], rbp",
    "mov [rdi + 24], rbx",
    "ret",
    ".cfi_endproc",
    ".size kgpatch_stackcheck_capture_caller, . - kgpatch_stackcheck_capture_caller",
    ".popsection",
);

extern "sysv64" {
    /// Writes the caller's return address, its stack pointer after the return, rbp and
    /// rbx to `out[0..4]`. Touches no other memory and no other register but rax.
    fn kgpatch_stackcheck_capture_caller(out: *mut [u64; 4]);
}

/// The calling function's registers at the call, as raw words for [`Regs::from_capture`].
/// Must be called directly by the frame to be walked, which stays alive during the walk.
#[inline(always)]
pub(crate) fn capture_caller(out: &mut [u64; 4]) {
    // SAFETY: the assembly function follows the SysV ABI (clobbers only rax, which is
    // caller-saved) and writes exactly 32 bytes through `out`, a valid &mut [u64; 4].
    unsafe { kgpatch_stackcheck_capture_caller(out) }
}

pub(crate) const RIP: u16 = 16;
pub(crate) const RSP: u16 = 7;
pub(crate) const RBP: u16 = 6;
/// Registers a callee preserves (SysV ABI), rsp aside.
pub(crate) const CALLEE_SAVED: [u16; 6] = [3, 6, 12, 13, 14, 15];
/// Bit mask of [`CALLEE_SAVED`].
pub(crate) const CALLEE_SAVED_MASK: u32 =
    (1 << 3) | (1 << 6) | (1 << 12) | (1 << 13) | (1 << 14) | (1 << 15);

/// A register context: rip, rsp and rbp always; the others when known. Fill it from the
/// signal's `ucontext_t` ([`Regs::from_ucontext`]) or by hand ([`Regs::new`] then
/// [`Regs::with`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Regs {
    values: [u64; 17],
    known: u32,
}

impl Regs {
    /// rip, rsp and rbp; every other register unknown (a CFI rule that needs one then makes
    /// the walk unreliable, never guessed).
    pub const fn new(rip: u64, rsp: u64, rbp: u64) -> Regs {
        let mut values = [0; 17];
        values[RIP as usize] = rip;
        values[RSP as usize] = rsp;
        values[RBP as usize] = rbp;
        Regs {
            values,
            known: (1 << RIP) | (1 << RSP) | (1 << RBP),
        }
    }

    /// The same context with `reg` set to `value`.
    pub const fn with(mut self, reg: Reg, value: u64) -> Regs {
        self.values[reg as usize] = value;
        self.known |= 1 << reg as u32;
        self
    }

    /// `reg`'s value, if known.
    pub const fn get(&self, reg: Reg) -> Option<u64> {
        self.get_dwarf(reg as u16)
    }

    /// The instruction pointer.
    pub const fn rip(&self) -> u64 {
        self.values[RIP as usize]
    }

    /// The stack pointer.
    pub const fn rsp(&self) -> u64 {
        self.values[RSP as usize]
    }

    /// The context the kernel saved in a signal's `ucontext_t`: all 16 general-purpose
    /// registers and rip.
    ///
    /// # Safety
    /// `uc` must point to a valid `ucontext_t`, e.g. the third argument of an `SA_SIGINFO`
    /// handler, readable for the duration of the call.
    pub unsafe fn from_ucontext(uc: *const libc::ucontext_t) -> Regs {
        // SAFETY: per the caller's guarantee uc points to a valid ucontext_t.
        let g = unsafe { &(*uc).uc_mcontext.gregs };
        let r = |i: libc::c_int| g[i as usize] as u64;
        Regs::new(r(libc::REG_RIP), r(libc::REG_RSP), r(libc::REG_RBP))
            .with(Reg::Rax, r(libc::REG_RAX))
            .with(Reg::Rdx, r(libc::REG_RDX))
            .with(Reg::Rcx, r(libc::REG_RCX))
            .with(Reg::Rbx, r(libc::REG_RBX))
            .with(Reg::Rsi, r(libc::REG_RSI))
            .with(Reg::Rdi, r(libc::REG_RDI))
            .with(Reg::R8, r(libc::REG_R8))
            .with(Reg::R9, r(libc::REG_R9))
            .with(Reg::R10, r(libc::REG_R10))
            .with(Reg::R11, r(libc::REG_R11))
            .with(Reg::R12, r(libc::REG_R12))
            .with(Reg::R13, r(libc::REG_R13))
            .with(Reg::R14, r(libc::REG_R14))
            .with(Reg::R15, r(libc::REG_R15))
    }

    /// The context [`capture_caller`] wrote: the calling frame at its call instruction.
    pub(crate) fn from_capture(raw: &[u64; 4]) -> Regs {
        // raw[0] is the return address; the call instruction is before it, and the frame's
        // CFI row there describes the stack as it is once the callee has returned.
        Regs::new(raw[0].wrapping_sub(1), raw[1], raw[2]).with(Reg::Rbx, raw[3])
    }

    #[inline]
    pub(crate) const fn get_dwarf(&self, n: u16) -> Option<u64> {
        if n <= RIP && self.known & (1 << n) != 0 {
            Some(self.values[n as usize])
        } else {
            None
        }
    }

    #[inline]
    pub(crate) fn set_dwarf(&mut self, n: u16, value: Option<u64>) {
        if n > RIP {
            return;
        }
        match value {
            Some(v) => {
                self.values[n as usize] = v;
                self.known |= 1 << n;
            }
            None => self.known &= !(1 << n),
        }
    }

    /// Keeps only the callee-saved registers' knowledge (what survives a call).
    #[inline]
    pub(crate) fn forget_caller_saved(&mut self) {
        self.known &= CALLEE_SAVED_MASK;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_knows_three_registers() {
        let r = Regs::new(1, 2, 3);
        assert_eq!(r.get(Reg::Rip), Some(1));
        assert_eq!(r.get(Reg::Rsp), Some(2));
        assert_eq!(r.get(Reg::Rbp), Some(3));
        assert_eq!(r.get(Reg::Rbx), None);
        assert_eq!(r.with(Reg::Rbx, 9).get(Reg::Rbx), Some(9));
    }

    #[inline(never)]
    fn captured() -> (Regs, u64) {
        let local = 0u64;
        let mut raw = [0; 4];
        capture_caller(&mut raw);
        (
            Regs::from_capture(&raw),
            core::hint::black_box(&local) as *const u64 as u64,
        )
    }

    #[test]
    fn capture_gives_a_pc_in_the_caller_and_a_stack_pointer_near_its_locals() {
        let (r, local) = captured();
        let f = captured as fn() -> (Regs, u64) as usize as u64;
        assert!(
            r.rip() > f && r.rip() < f + 4096,
            "rip {:#x} fn {:#x}",
            r.rip(),
            f
        );
        assert!(r.rsp() <= local && local - r.rsp() < 4096);
    }
}
