//! One unwind step on x86-64: from a frame's registers to its caller's, following the
//! DWARF CFI row that covers the frame's pc.
//!
//! Why not framehop: framehop 0.16 (checked in its source) falls back to frame-pointer
//! unwinding, silently, whenever a pc is outside every module, has no FDE, or has a CFI
//! row it cannot evaluate (`UnwinderInternal::with_cache` maps those errors to
//! `UnwindRule::fallback_rule()`), and its API does not say when it did. A guessed frame
//! can hide a busy function, so this crate parses CFI with gimli itself and turns every
//! such case into an unreliable walk. The fast path (a small cached rule per pc, executed
//! with checked arithmetic) follows framehop's design.

use gimli::{
    CfaRule, EhFrame, Encoding, Evaluation, EvaluationResult, Location, Register, RegisterRule,
    UnwindSection, UnwindTableRow, Value, X86_64,
};

use super::regs::{Regs, CALLEE_SAVED, RBP, RIP, RSP};
use crate::bounds::StackReader;
use crate::cache::{FixedStorage, WalkCache};
use crate::index::{Slice, UnwindIndex};
use crate::outcome::UnreliableReason as Why;

/// A saved-register slot meaning "same value as in the callee".
const SAME: i16 = i16::MAX;
/// A saved-register slot meaning "unknown in the caller".
const UNKNOWN: i16 = i16::MIN;

/// The most operations one DWARF expression may run before it counts as bad unwind info:
/// keeps a looping (or hostile) expression from stalling a walk in a signal handler.
const MAX_EXPRESSION_STEPS: u32 = 256;

/// Where a [`FastRule`]'s CFA comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum CfaBase {
    /// The outermost frame: the return address is undefined, the walk ends here.
    Outermost,
    /// CFA = rsp + offset.
    Rsp,
    /// CFA = rbp + offset.
    Rbp,
}

/// A CFI row reduced to what a walk needs, cached per pc. Covers rows whose CFA is rsp or
/// rbp plus an offset, whose return address and callee-saved registers are saved at CFA
/// offsets, and which leave caller-saved registers alone (almost every row of compiled
/// code). Other rows are evaluated from CFI each time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct FastRule {
    /// The register the CFA is an offset from (or none: the outermost frame).
    base: CfaBase,
    cfa_off: i32,
    ra_off: i16,
    /// For rbx, rbp, r12..r15: the CFA offset of the saved value, or [`SAME`]/[`UNKNOWN`].
    saved: [i16; 6],
}

impl FastRule {
    pub(crate) const OUTERMOST: FastRule = FastRule {
        base: CfaBase::Outermost,
        cfa_off: 0,
        ra_off: 0,
        saved: [SAME; 6],
    };

    fn from_row(row: &UnwindTableRow<usize, FixedStorage>) -> Option<FastRule> {
        let base = match row.cfa() {
            CfaRule::RegisterAndOffset { register, .. } if *register == X86_64::RSP => CfaBase::Rsp,
            CfaRule::RegisterAndOffset { register, .. } if *register == X86_64::RBP => CfaBase::Rbp,
            _ => return None,
        };
        let CfaRule::RegisterAndOffset { offset, .. } = row.cfa() else {
            return None;
        };
        let cfa_off = i32::try_from(*offset).ok()?;
        let ra_off = match row.register(X86_64::RA) {
            RegisterRule::Undefined => return Some(FastRule::OUTERMOST),
            RegisterRule::Offset(o) => small(o)?,
            _ => return None,
        };
        let mut saved = [SAME; 6];
        for (reg, rule) in row.registers() {
            if *reg == X86_64::RA || reg.0 > RIP {
                continue;
            }
            let Some(slot) = CALLEE_SAVED.iter().position(|r| *r == reg.0) else {
                // A caller-saved register or rsp with an explicit rule: take the slow path.
                if matches!(rule, RegisterRule::Undefined) {
                    continue;
                }
                return None;
            };
            saved[slot] = match rule {
                RegisterRule::Undefined => UNKNOWN,
                RegisterRule::SameValue => SAME,
                RegisterRule::Offset(o) => small(*o)?,
                _ => return None,
            };
        }
        Some(FastRule {
            base,
            cfa_off,
            ra_off,
            saved,
        })
    }
}

/// `o` as an i16 offset that is not one of the sentinels.
fn small(o: i64) -> Option<i16> {
    i16::try_from(o)
        .ok()
        .filter(|v| *v != SAME && *v != UNKNOWN)
}

/// What one step found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Step {
    /// The frame is the thread's outermost one (its return address is undefined).
    Outermost,
    /// `regs` now hold the caller's registers. `exact` is `true` when the new pc is a
    /// resumption address (after a signal frame), `false` for a return address.
    Caller { exact: bool },
}

type Res<T> = Result<T, Why>;

/// Unwinds one frame whose unwind information is looked up at `lookup` (the pc, or the
/// return address minus one). On success `regs` hold the caller's registers.
#[inline]
pub(crate) fn step<M: StackReader>(
    index: &UnwindIndex,
    cache: &mut WalkCache,
    lookup: u64,
    regs: &mut Regs,
    mem: &mut M,
) -> Res<Step> {
    if let Some(rule) = cache.lookup(lookup, index.id()) {
        return exec_fast(rule, regs, mem);
    }
    let module = index.module_for(lookup).ok_or(Why::UnknownCode)?;
    let eh = module.eh.as_ref().ok_or(Why::NoUnwindInfo)?;
    let table = eh.hdr.table().ok_or(Why::NoUnwindInfo)?;
    let fde = table
        .fde_for_address(&eh.eh_frame, &eh.bases, lookup, EhFrame::cie_from_offset)
        .map_err(|e| match e {
            gimli::Error::NoUnwindInfoForAddress => Why::NoUnwindInfo,
            _ => Why::BadUnwindInfo,
        })?;
    if fde.cie().return_address_register() != X86_64::RA {
        return Err(Why::UnsupportedRule);
    }
    let signal = fde.is_signal_trampoline();
    let encoding = fde.cie().encoding();
    let (ctx, mut sink) = cache.parts();
    let row = fde
        .unwind_info_for_address(&eh.eh_frame, &eh.bases, ctx, lookup)
        .map_err(|_| Why::BadUnwindInfo)?;
    if !signal {
        if let Some(rule) = FastRule::from_row(row) {
            sink.insert(lookup, index.id(), rule);
            return exec_fast(rule, regs, mem);
        }
    }
    exec_row(row, &eh.eh_frame, encoding, signal, regs, mem)
}

/// Executes a cached rule.
#[inline]
fn exec_fast<M: StackReader>(rule: FastRule, regs: &mut Regs, mem: &mut M) -> Res<Step> {
    let base = match rule.base {
        CfaBase::Outermost => return Ok(Step::Outermost),
        CfaBase::Rsp => regs.get_dwarf(RSP),
        CfaBase::Rbp => regs.get_dwarf(RBP),
    }
    .ok_or(Why::CfaNotRecoverable)?;
    let cfa = base
        .checked_add_signed(i64::from(rule.cfa_off))
        .ok_or(Why::Overflow)?;
    let ra_at = cfa
        .checked_add_signed(i64::from(rule.ra_off))
        .ok_or(Why::Overflow)?;
    let ra = mem.read_u64(ra_at).ok_or(Why::ReadOutOfBounds)?;
    let old_sp = regs.rsp();
    let mut next = *regs;
    next.forget_caller_saved();
    for (slot, reg) in CALLEE_SAVED.iter().enumerate() {
        match rule.saved[slot] {
            SAME => {}
            UNKNOWN => next.set_dwarf(*reg, None),
            off => {
                // A register whose slot cannot be read is unknown, not an error: only a
                // later rule that needs it fails.
                let v = cfa
                    .checked_add_signed(i64::from(off))
                    .and_then(|a| mem.read_u64(a));
                next.set_dwarf(*reg, v);
            }
        }
    }
    finish(regs, next, cfa, ra, old_sp, false)
}

/// Checks progress and commits the caller's registers.
#[inline]
fn finish(
    regs: &mut Regs,
    mut next: Regs,
    sp: u64,
    ra: u64,
    old_sp: u64,
    exact: bool,
) -> Res<Step> {
    if sp <= old_sp {
        return Err(Why::StackDidNotAdvance);
    }
    next.set_dwarf(RSP, Some(sp));
    next.set_dwarf(RIP, Some(ra));
    *regs = next;
    Ok(Step::Caller { exact })
}

/// Evaluates a full CFI row: expressions, register rules of every kind, signal frames.
fn exec_row<M: StackReader>(
    row: &UnwindTableRow<usize, FixedStorage>,
    eh_frame: &EhFrame<Slice>,
    encoding: Encoding,
    signal: bool,
    regs: &mut Regs,
    mem: &mut M,
) -> Res<Step> {
    let cfa = match row.cfa() {
        CfaRule::RegisterAndOffset { register, offset } => regs
            .get_dwarf(register.0)
            .ok_or(Why::CfaNotRecoverable)?
            .checked_add_signed(*offset)
            .ok_or(Why::Overflow)?,
        CfaRule::Expression(e) => {
            let expr = e.get(eh_frame).map_err(|_| Why::BadUnwindInfo)?;
            eval(expr, encoding, regs, None, mem).map_err(|w| match w {
                Why::UnsupportedRule => Why::CfaNotRecoverable,
                w => w,
            })?
        }
    };
    let ra = match row.register(X86_64::RA) {
        RegisterRule::Undefined => return Ok(Step::Outermost),
        rule => rule_value(&rule, X86_64::RA, cfa, eh_frame, encoding, regs, mem)?
            .ok_or(Why::UnsupportedRule)?,
    };
    let mut next = *regs;
    next.forget_caller_saved();
    for (reg, rule) in row.registers() {
        if reg.0 >= RIP || reg.0 == RSP {
            continue;
        }
        let v = rule_value(rule, *reg, cfa, eh_frame, encoding, regs, mem).unwrap_or(None);
        next.set_dwarf(reg.0, v);
    }
    let sp = match row.register(X86_64::RSP) {
        RegisterRule::Undefined => cfa,
        rule => rule_value(&rule, X86_64::RSP, cfa, eh_frame, encoding, regs, mem)?
            .ok_or(Why::CfaNotRecoverable)?,
    };
    finish(regs, next, sp, ra, regs.rsp(), signal)
}

/// The caller's value of `reg` under `rule`; `None` if unknown.
fn rule_value<M: StackReader>(
    rule: &RegisterRule<usize>,
    reg: Register,
    cfa: u64,
    eh_frame: &EhFrame<Slice>,
    encoding: Encoding,
    regs: &Regs,
    mem: &mut M,
) -> Res<Option<u64>> {
    let at = |off: i64| cfa.checked_add_signed(off).ok_or(Why::Overflow);
    Ok(match rule {
        RegisterRule::Undefined => None,
        RegisterRule::SameValue => regs.get_dwarf(reg.0),
        RegisterRule::Offset(o) => Some(mem.read_u64(at(*o)?).ok_or(Why::ReadOutOfBounds)?),
        RegisterRule::ValOffset(o) => Some(at(*o)?),
        RegisterRule::Register(r) => regs.get_dwarf(r.0),
        RegisterRule::Expression(e) => {
            let expr = e.get(eh_frame).map_err(|_| Why::BadUnwindInfo)?;
            let addr = eval(expr, encoding, regs, Some(cfa), mem)?;
            Some(mem.read_u64(addr).ok_or(Why::ReadOutOfBounds)?)
        }
        RegisterRule::ValExpression(e) => {
            let expr = e.get(eh_frame).map_err(|_| Why::BadUnwindInfo)?;
            Some(eval(expr, encoding, regs, Some(cfa), mem)?)
        }
        RegisterRule::Constant(c) => Some(*c),
        _ => return Err(Why::UnsupportedRule),
    })
}

/// Evaluates a DWARF expression with fixed storage; registers come from `regs`, memory
/// from `mem`. Returns the resulting address (or value, for `DW_OP_stack_value`).
fn eval<M: StackReader>(
    expr: gimli::Expression<Slice>,
    encoding: Encoding,
    regs: &Regs,
    initial: Option<u64>,
    mem: &mut M,
) -> Res<u64> {
    let mut ev: Evaluation<Slice, FixedStorage> = Evaluation::new_in(expr.0, encoding);
    if let Some(v) = initial {
        ev.set_initial_value(v);
    }
    ev.set_max_iterations(MAX_EXPRESSION_STEPS);
    let mut state = ev.evaluate();
    loop {
        match state.map_err(|_| Why::BadUnwindInfo)? {
            EvaluationResult::Complete => break,
            EvaluationResult::RequiresRegister { register, .. } => {
                let v = regs.get_dwarf(register.0).ok_or(Why::CfaNotRecoverable)?;
                state = ev.resume_with_register(Value::Generic(v));
            }
            EvaluationResult::RequiresMemory {
                address,
                size,
                space: None,
                ..
            } if (1..=8).contains(&size) => {
                let w = mem.read_u64(address).ok_or(Why::ReadOutOfBounds)?;
                let v = if size == 8 {
                    w
                } else {
                    w & ((1u64 << (u32::from(size) * 8)) - 1)
                };
                state = ev.resume_with_memory(Value::Generic(v));
            }
            _ => return Err(Why::UnsupportedRule),
        }
    }
    match ev.as_result() {
        [piece] if piece.size_in_bits.is_none() => match piece.location {
            Location::Address { address } => Ok(address),
            Location::Value { value } => value.to_u64(u64::MAX).map_err(|_| Why::UnsupportedRule),
            _ => Err(Why::UnsupportedRule),
        },
        _ => Err(Why::UnsupportedRule),
    }
}
