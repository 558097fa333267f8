//! The bootstrap mapping: its layout, and the machine code assembled at the address the
//! remote `mmap` returned.
//!
//! Two pieces of code live in it:
//! - `after_create`, where the borrowed thread returns from `pthread_create`: it stores the
//!   result, raises `hijack_done` and sleeps in `pause()` (which neither spins nor touches the
//!   thread's restart block) until the injector interrupts it and puts its registers back.
//! - `thread_main`, the new thread: `pthread_detach(pthread_self())`, `dlopen(agent,
//!   RTLD_NOW)`, `dlsym("kgpatch_agent_attach")`, the call, the result and message stored
//!   in the mapping; then it waits (bounded: 10,000 × 1 ms) for the injector to say it has
//!   read the result AND that the borrowed thread has left the mapping, and leaves by
//!   tail-jumping to `munmap(mapping)` with its own return address into libc's
//!   `start_thread` on the stack, so munmap returns straight into libc and the thread ends
//!   as if `thread_main` had returned 0. If the injector never says the borrowed thread has
//!   left, the mapping is left in place (a leak is better than unmapping code a thread may
//!   still run).

use iced_x86::code_asm::*;

/// Size of the mapping.
pub(crate) const LEN: u64 = 0x10000;

/// Offsets in the mapping.
pub(crate) mod off {
    pub const THREAD_MAIN: u64 = 0x000;
    pub const AFTER_CREATE: u64 = 0x400;
    // function pointers
    pub const DLOPEN: u64 = 0x800;
    pub const DLSYM: u64 = 0x808;
    pub const DLERROR: u64 = 0x810;
    pub const MUNMAP: u64 = 0x818;
    pub const PTHREAD_SELF: u64 = 0x820;
    pub const PTHREAD_DETACH: u64 = 0x828;
    pub const MAP_LEN: u64 = 0x830;
    // words written by the two threads / the injector
    pub const TID_SLOT: u64 = 0x840;
    pub const CREATE_RES: u64 = 0x848;
    pub const HIJACK_DONE: u64 = 0x84c;
    pub const ACK_LEFT: u64 = 0x850;
    pub const ACK_READ: u64 = 0x854;
    pub const STATE: u64 = 0x858;
    pub const AGENT_RET: u64 = 0x85c;
    pub const FAIL_KIND: u64 = 0x860;
    pub const TS_1MS: u64 = 0x870;
    // strings
    pub const AGENT_PATH: u64 = 0x1000;
    pub const SYMBOL: u64 = 0x2000;
    pub const RUNTIME_DIR: u64 = 0x2100;
    pub const RUNTIME_DIR_MAX: u64 = 0x3000 - RUNTIME_DIR;
    pub const ERRBUF: u64 = 0x3000;
    pub const ERRBUF_LEN: u64 = 0x1000;
    /// Top of the stack the borrowed thread runs pthread_create on (the stack grows down to
    /// 0x4000: 48 KiB); the slot just below it holds the return address to AFTER_CREATE.
    pub const STACK_TOP: u64 = super::LEN;
}

/// `STATE` values.
pub(crate) mod state {
    pub const RUNNING: u32 = 0;
    pub const CALLED: u32 = 1;
    pub const DLOPEN_FAILED: u32 = 2;
    pub const DLSYM_FAILED: u32 = 3;
}

/// The symbol the agent exports.
pub(crate) const ENTRY: &str = "kgpatch_agent_attach";

/// What goes into the mapping.
pub(crate) struct Inputs<'a> {
    pub dlopen: u64,
    pub dlsym: u64,
    pub dlerror: u64,
    pub munmap: u64,
    pub pthread_self: u64,
    pub pthread_detach: u64,
    pub agent_path: &'a [u8],
    pub runtime_dir: &'a [u8],
}

fn d(o: u64) -> i32 {
    o as i32
}

fn thread_main(base: u64) -> Result<Vec<u8>, IcedError> {
    let mut a = CodeAssembler::new(64)?;
    let mut dlopen_fail = a.create_label();
    let mut dlsym_fail = a.create_label();
    let mut copy_err = a.create_label();
    let mut copy_loop = a.create_label();
    let mut copy_term = a.create_label();
    let mut set_state = a.create_label();
    let mut wait = a.create_label();
    let mut wait_loop = a.create_label();
    let mut sleep = a.create_label();
    let mut unmap = a.create_label();
    let mut keep = a.create_label();

    // entry: rsp = 8 mod 16; one push realigns for the calls below
    a.push(rbx)?;
    a.mov(rbx, rdi)?;
    a.call(qword_ptr(rbx + d(off::PTHREAD_SELF)))?;
    a.mov(rdi, rax)?;
    a.call(qword_ptr(rbx + d(off::PTHREAD_DETACH)))?;
    a.lea(rdi, qword_ptr(rbx + d(off::AGENT_PATH)))?;
    a.mov(esi, libc::RTLD_NOW | libc::RTLD_LOCAL)?;
    a.call(qword_ptr(rbx + d(off::DLOPEN)))?;
    a.test(rax, rax)?;
    a.jz(dlopen_fail)?;
    a.mov(rdi, rax)?;
    a.lea(rsi, qword_ptr(rbx + d(off::SYMBOL)))?;
    a.call(qword_ptr(rbx + d(off::DLSYM)))?;
    a.test(rax, rax)?;
    a.jz(dlsym_fail)?;
    a.lea(rdi, qword_ptr(rbx + d(off::RUNTIME_DIR)))?;
    a.lea(rsi, qword_ptr(rbx + d(off::ERRBUF)))?;
    a.mov(edx, off::ERRBUF_LEN as u32)?;
    a.call(rax)?;
    a.mov(dword_ptr(rbx + d(off::AGENT_RET)), eax)?;
    a.mov(dword_ptr(rbx + d(off::STATE)), state::CALLED)?;
    a.jmp(wait)?;

    a.set_label(&mut dlopen_fail)?;
    a.mov(dword_ptr(rbx + d(off::FAIL_KIND)), state::DLOPEN_FAILED)?;
    a.jmp(copy_err)?;
    a.set_label(&mut dlsym_fail)?;
    a.mov(dword_ptr(rbx + d(off::FAIL_KIND)), state::DLSYM_FAILED)?;
    a.set_label(&mut copy_err)?;
    a.call(qword_ptr(rbx + d(off::DLERROR)))?;
    a.test(rax, rax)?;
    a.jz(set_state)?;
    a.lea(rdi, qword_ptr(rbx + d(off::ERRBUF)))?;
    a.mov(rsi, rax)?;
    a.mov(ecx, (off::ERRBUF_LEN - 1) as u32)?;
    a.set_label(&mut copy_loop)?;
    a.test(ecx, ecx)?;
    a.jz(copy_term)?;
    a.mov(al, byte_ptr(rsi))?;
    a.mov(byte_ptr(rdi), al)?;
    a.test(al, al)?;
    a.jz(set_state)?;
    a.inc(rsi)?;
    a.inc(rdi)?;
    a.dec(ecx)?;
    a.jmp(copy_loop)?;
    a.set_label(&mut copy_term)?;
    a.mov(byte_ptr(rdi), 0)?;
    a.set_label(&mut set_state)?;
    a.mov(eax, dword_ptr(rbx + d(off::FAIL_KIND)))?;
    a.mov(dword_ptr(rbx + d(off::STATE)), eax)?;

    // wait for the injector, at most 10,000 sleeps of 1 ms (r9 survives syscalls)
    a.set_label(&mut wait)?;
    a.mov(r9d, 10_000u32)?;
    a.set_label(&mut wait_loop)?;
    a.mov(eax, dword_ptr(rbx + d(off::ACK_LEFT)))?;
    a.test(eax, eax)?;
    a.jz(sleep)?;
    a.mov(eax, dword_ptr(rbx + d(off::ACK_READ)))?;
    a.test(eax, eax)?;
    a.jnz(unmap)?;
    a.set_label(&mut sleep)?;
    a.mov(eax, libc::SYS_nanosleep as u32)?;
    a.lea(rdi, qword_ptr(rbx + d(off::TS_1MS)))?;
    a.xor(esi, esi)?;
    a.syscall()?;
    a.dec(r9d)?;
    a.jnz(wait_loop)?;
    a.mov(eax, dword_ptr(rbx + d(off::ACK_LEFT)))?;
    a.test(eax, eax)?;
    a.jz(keep)?;

    // munmap(base, LEN) returning straight into start_thread
    a.set_label(&mut unmap)?;
    a.mov(rdi, rbx)?;
    a.mov(rsi, qword_ptr(rbx + d(off::MAP_LEN)))?;
    a.mov(rax, qword_ptr(rbx + d(off::MUNMAP)))?;
    a.pop(rbx)?;
    a.jmp(rax)?;

    // the borrowed thread may still be in here: leave the mapping, return 0
    a.set_label(&mut keep)?;
    a.pop(rbx)?;
    a.xor(eax, eax)?;
    a.ret()?;
    a.assemble(base)
}

fn after_create(base: u64) -> Result<Vec<u8>, IcedError> {
    let mut a = CodeAssembler::new(64)?;
    let mut again = a.create_label();
    a.mov(rbx, base)?;
    a.mov(dword_ptr(rbx + d(off::CREATE_RES)), eax)?;
    a.mov(dword_ptr(rbx + d(off::HIJACK_DONE)), 1u32)?;
    a.set_label(&mut again)?;
    a.mov(eax, libc::SYS_pause as u32)?;
    a.syscall()?;
    a.jmp(again)?;
    a.assemble(base + off::AFTER_CREATE)
}

/// The mapping's whole content for a mapping at `base`.
pub(crate) fn build(base: u64, inp: &Inputs<'_>) -> Result<Vec<u8>, String> {
    let mut page = vec![0u8; LEN as usize];
    let main = thread_main(base + off::THREAD_MAIN).map_err(|e| e.to_string())?;
    let after = after_create(base).map_err(|e| e.to_string())?;
    if main.len() as u64 > off::AFTER_CREATE || after.len() > 0x400 {
        return Err("bootstrap code larger than its slot".into());
    }
    if inp.agent_path.len() as u64 >= off::SYMBOL - off::AGENT_PATH
        || inp.runtime_dir.len() as u64 >= off::RUNTIME_DIR_MAX
    {
        return Err("agent path or runtime directory too long".into());
    }
    let put = |page: &mut Vec<u8>, at: u64, bytes: &[u8]| {
        page[at as usize..at as usize + bytes.len()].copy_from_slice(bytes);
    };
    put(&mut page, off::THREAD_MAIN, &main);
    put(&mut page, off::AFTER_CREATE, &after);
    for (o, v) in [
        (off::DLOPEN, inp.dlopen),
        (off::DLSYM, inp.dlsym),
        (off::DLERROR, inp.dlerror),
        (off::MUNMAP, inp.munmap),
        (off::PTHREAD_SELF, inp.pthread_self),
        (off::PTHREAD_DETACH, inp.pthread_detach),
        (off::MAP_LEN, LEN),
        (off::TS_1MS + 8, 1_000_000),
        (off::STACK_TOP - 8, base + off::AFTER_CREATE),
    ] {
        put(&mut page, o, &v.to_le_bytes());
    }
    put(&mut page, off::AGENT_PATH, inp.agent_path);
    put(&mut page, off::SYMBOL, ENTRY.as_bytes());
    put(&mut page, off::RUNTIME_DIR, inp.runtime_dir);
    Ok(page)
}
