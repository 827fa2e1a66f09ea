//! What a uprobe costs where it sits, read from the machine code (x86-64, iced-x86).
//!
//! The kernel runs the probed instruction itself, out of line. A few it emulates instead:
//! `push` of a register, `call`/`jmp`/`jcc` to a relative target, and NOPs (arch/x86/kernel/
//! uprobes.c). Those cost ~0.6 µs a hit. Every other instruction is single-stepped, and on a
//! KVM guest the debug trap exits to the hypervisor: ~14.5 µs a hit. A uretprobe returns
//! through the uretprobe syscall, with no trap, but hooks the function's entry like a uprobe.

use iced_x86::{
    Decoder, DecoderOptions, FlowControl, Instruction, InstructionInfoFactory, Mnemonic, OpAccess,
    OpKind, Register,
};

/// Instructions followed from a function's entry looking for its first call.
const MAX_INSTRUCTIONS: usize = 48;
/// Instructions of Go's stack check, up to its `jbe`.
const MAX_PROLOGUE: usize = 6;

/// How the kernel runs an instruction under a uprobe.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Execution {
    Emulated,
    SingleStepped,
}

/// Instructions decoded from `code`, which starts at `ip`; stops at the first that does not
/// decode (the end of the bytes, or not code).
fn instructions(code: &[u8], ip: u64) -> impl Iterator<Item = Instruction> + '_ {
    Decoder::with_ip(64, code, ip, DecoderOptions::NONE)
        .into_iter()
        .take_while(|instruction| !instruction.is_invalid())
}

fn emulated(instruction: &Instruction) -> bool {
    let relative = instruction.op0_kind() == OpKind::NearBranch64;
    match instruction.mnemonic() {
        Mnemonic::Push => {
            instruction.op0_kind() == OpKind::Register && instruction.op0_register().is_gpr64()
        }
        Mnemonic::Nop => true,
        Mnemonic::Call | Mnemonic::Jmp => relative,
        _ => instruction.is_jcc_short_or_near() && relative,
    }
}

/// How the instruction at the start of `code` (at `ip`) runs under a uprobe; `None` when the
/// bytes are no instruction.
pub fn execution(code: &[u8], ip: u64) -> Option<Execution> {
    let first = instructions(code, ip).next()?;
    Some(if emulated(&first) {
        Execution::Emulated
    } else {
        Execution::SingleStepped
    })
}

/// Registers `instruction` writes (full 64-bit names), added to `written`.
fn note_writes(
    info: &mut InstructionInfoFactory,
    instruction: &Instruction,
    written: &mut Vec<Register>,
) {
    for used in info.info(instruction).used_registers() {
        let writes = !matches!(
            used.access(),
            OpAccess::Read | OpAccess::CondRead | OpAccess::NoMemAccess
        );
        let register = used.register().full_register();
        if writes && register != Register::None && !written.contains(&register) {
            written.push(register);
        }
    }
}

/// The offset of the `jbe` that ends Go's stack check at the entry of the function `code` holds
/// (at `ip`): `cmp` of the stack pointer (or RSP minus the frame, in R12) against the goroutine's
/// stack bound at 16(R14), then `jbe` to the code that grows the stack and starts the function
/// over. The kernel emulates the `jbe`, and, when the instructions before it write none of
/// `arguments`, a uprobe there sees the arguments as the entry does. A hit whose jump is taken
/// (CF or ZF set) is followed by a second one once the stack has grown: the programs skip it.
pub fn go_stack_check_jump(code: &[u8], ip: u64, arguments: &[Register]) -> Option<u64> {
    let mut info = InstructionInfoFactory::new();
    let mut written = Vec::new();
    let mut compared_bound = false;
    for instruction in instructions(code, ip).take(MAX_PROLOGUE) {
        if instruction.mnemonic() == Mnemonic::Jbe && compared_bound {
            return arguments
                .iter()
                .all(|register| !written.contains(register))
                .then(|| instruction.ip() - ip);
        }
        compared_bound = instruction.mnemonic() == Mnemonic::Cmp
            && instruction.memory_base() == Register::R14
            && instruction.memory_displacement64() == 16;
        // A large frame checks for wrap-around first (`jb` to the same place): fine to pass.
        if instruction.flow_control() != FlowControl::Next
            && !(instruction.is_jcc_short_or_near() && instruction.mnemonic() == Mnemonic::Jb)
        {
            return None;
        }
        note_writes(&mut info, &instruction, &mut written);
    }
    None
}

/// The offsets of the instructions `wanted` picks in the function `code` holds entirely (at
/// `ip`), decoded from its first byte to its last: `None` unless every byte belongs to a valid
/// instruction, so each offset is an instruction boundary.
fn find_instructions(
    code: &[u8],
    ip: u64,
    wanted: impl Fn(&Instruction) -> bool,
) -> Option<Vec<u64>> {
    let mut decoded = 0;
    let mut offsets = Vec::new();
    for instruction in instructions(code, ip) {
        decoded += instruction.len();
        if wanted(&instruction) {
            offsets.push(instruction.ip() - ip);
        }
    }
    (decoded == code.len()).then_some(offsets)
}

/// Every `ret` of the function `code` holds (see [`find_instructions`]); `None` if it has none.
pub fn returns(code: &[u8], ip: u64) -> Option<Vec<u64>> {
    find_instructions(code, ip, |instruction| {
        instruction.mnemonic() == Mnemonic::Ret
    })
    .filter(|offsets| !offsets.is_empty())
}

/// The one direct call of the function at `target` in the function `code` holds (see
/// [`find_instructions`]); `None` if there is none or more than one.
pub fn only_call_to(code: &[u8], ip: u64, target: u64) -> Option<u64> {
    let calls = find_instructions(code, ip, |instruction| {
        instruction.mnemonic() == Mnemonic::Call
            && instruction.op0_kind() == OpKind::NearBranch64
            && instruction.near_branch_target() == target
    })?;
    match calls[..] {
        [offset] => Some(offset),
        _ => None,
    }
}

/// The stack slot, as an offset from RSP in the function's body, holding the value `argument`
/// had at entry: Go's register ABI spills arguments to slots its caller reserves just above the
/// return address. Proven from the code of the whole function `code` holds (at `ip`): its
/// straight prologue (the stack check, `push`es, one `sub rsp`) stores `argument` unchanged at
/// entry RSP + 8 after setting up the frame; nothing else in the function writes that slot; and
/// RSP changes nowhere else but in epilogues (`add rsp`, `pop`, `leave`, `ret`), so it is the
/// same at every instruction of the body.
pub fn spilled_argument_slot(code: &[u8], ip: u64, argument: Register) -> Option<u64> {
    let all: Vec<Instruction> = instructions(code, ip).collect();
    if all.iter().map(Instruction::len).sum::<usize>() != code.len() {
        return None;
    }
    let mut info = InstructionInfoFactory::new();
    let (mut frame, mut spill, mut written) = (0u64, None, Vec::new());
    let mut body = all.len();
    for (index, instruction) in all.iter().enumerate() {
        let stores_argument = instruction.mnemonic() == Mnemonic::Mov
            && instruction.op0_kind() == OpKind::Memory
            && instruction.memory_base() == Register::RSP
            && instruction.memory_index() == Register::None
            && instruction.op1_kind() == OpKind::Register
            && instruction.op1_register() == argument;
        if instruction.mnemonic() == Mnemonic::Push && instruction.op0_kind() == OpKind::Register {
            frame += 8;
        } else if instruction.mnemonic() == Mnemonic::Sub
            && instruction.op0_register() == Register::RSP
            && instruction.op1_kind() != OpKind::Register
        {
            frame += instruction.immediate(1);
        } else if stores_argument {
            if !written.contains(&argument) && instruction.memory_displacement64() == frame + 8 {
                spill.get_or_insert(frame + 8);
            }
        } else if index < 3 && instruction.is_jcc_short_or_near() {
            continue; // the stack check
        } else if instruction.flow_control() != FlowControl::Next
            || moves_rsp(&mut info, instruction)
        {
            body = index;
            break;
        }
        note_writes(&mut info, instruction, &mut written);
    }
    let slot = spill?;
    for instruction in &all[body..] {
        let epilogue = matches!(
            instruction.mnemonic(),
            Mnemonic::Add | Mnemonic::Pop | Mnemonic::Leave | Mnemonic::Ret | Mnemonic::Call
        );
        if writes_stack(&mut info, instruction, slot..slot + 8)
            || (moves_rsp(&mut info, instruction) && !epilogue)
        {
            return None;
        }
    }
    Some(slot)
}

/// Whether `instruction` changes RSP.
fn moves_rsp(info: &mut InstructionInfoFactory, instruction: &Instruction) -> bool {
    info.info(instruction).used_registers().iter().any(|used| {
        used.register().full_register() == Register::RSP
            && !matches!(used.access(), OpAccess::Read | OpAccess::CondRead)
    })
}

/// Whether `instruction` writes any byte of `slot` (offsets from RSP).
fn writes_stack(
    info: &mut InstructionInfoFactory,
    instruction: &Instruction,
    slot: std::ops::Range<u64>,
) -> bool {
    info.info(instruction).used_memory().iter().any(|memory| {
        // Displacements are two's complement: a negative one is below RSP, never the slot.
        let start = memory.displacement() as i64;
        let end = start + memory.memory_size().size() as i64;
        let slot = slot.start as i64..slot.end as i64;
        // An indexed write off RSP could reach anywhere in the frame: count it as the slot.
        memory.base() == Register::RSP
            && !matches!(
                memory.access(),
                OpAccess::Read | OpAccess::CondRead | OpAccess::NoMemAccess
            )
            && (memory.index() != Register::None || (start < slot.end && slot.start < end))
    })
}

/// A function's first call and what happened before it.
#[derive(Debug, PartialEq, Eq)]
pub struct FirstCall {
    /// Address of the called function.
    pub target: u64,
    /// Offset of the call instruction from the function's entry.
    pub offset: u64,
    /// Registers written on the way (full 64-bit names).
    pub written: Vec<Register>,
}

impl FirstCall {
    /// Whether every one of `registers` still holds what the function received.
    pub fn preserves(&self, registers: &[Register]) -> bool {
        registers
            .iter()
            .all(|register| !self.written.contains(register))
    }
}

/// The first direct call on the path from the entry of the function `code` holds (at `ip`),
/// taking the fall-through of conditional branches (error checks), with the registers written
/// before it. `None` when the path returns, jumps or calls indirectly first.
pub fn first_call(code: &[u8], ip: u64) -> Option<FirstCall> {
    let mut info = InstructionInfoFactory::new();
    let mut written = Vec::new();
    for instruction in instructions(code, ip).take(MAX_INSTRUCTIONS) {
        match instruction.flow_control() {
            FlowControl::Call if instruction.op0_kind() == OpKind::NearBranch64 => {
                return Some(FirstCall {
                    target: instruction.near_branch_target(),
                    offset: instruction.ip() - ip,
                    written,
                });
            }
            FlowControl::Next | FlowControl::ConditionalBranch => {
                note_writes(&mut info, &instruction, &mut written);
            }
            _ => return None,
        }
    }
    None
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    /// Debian 12's libssl.so.3 (OpenSSL 3.0): `SSL_read` up to and including the call of the
    /// internal read function, at file offset 0x35470.
    pub const SSL_READ: &[u8] = &[
        0x48, 0x83, 0xec, 0x18, // sub $0x18,%rsp
        0x64, 0x48, 0x8b, 0x04, 0x25, 0x28, 0x00, 0x00, 0x00, // mov %fs:0x28,%rax
        0x48, 0x89, 0x44, 0x24, 0x08, // mov %rax,0x8(%rsp)
        0x31, 0xc0, // xor %eax,%eax
        0x85, 0xd2, // test %edx,%edx
        0x78, 0x2f, // js error
        0x48, 0x89, 0xe1, // mov %rsp,%rcx   (&readbytes)
        0x48, 0x63, 0xd2, // movslq %edx,%rdx
        0xe8, 0x3d, 0xfe, 0xff, 0xff, // call 0x352d0
    ];
    pub const SSL_READ_AT: u64 = 0x35470;
    /// `SSL_read_ex`: calls the same function with its own arguments.
    pub const SSL_READ_EX: &[u8] = &[
        0x48, 0x83, 0xec, 0x08, // sub $0x8,%rsp
        0xe8, 0xc7, 0xfd, 0xff, 0xff, // call 0x352d0
        0x31, 0xd2, 0x85, 0xc0, 0x0f, 0x48, 0xc2, 0x48, 0x83, 0xc4, 0x08, 0xc3,
    ];
    pub const SSL_READ_EX_AT: u64 = 0x35500;
    /// The internal read function: `push %r13; push %r12; push %rbp; push %rbx; sub ...`.
    pub const READ_INTERNAL: &[u8] = &[0x41, 0x55, 0x41, 0x54, 0x55, 0x53, 0x48, 0x83, 0xec, 0x38];
    pub const READ_INTERNAL_AT: u64 = 0x352d0;

    #[test]
    fn push_call_jumps_and_nops_are_emulated_the_rest_single_stepped() {
        let cases: [(&[u8], Execution); 8] = [
            (&[0x55], Execution::Emulated),                        // push %rbp
            (&[0x41, 0x57], Execution::Emulated),                  // push %r15
            (&[0xe8, 0, 0, 0, 0], Execution::Emulated),            // call rel32
            (&[0x0f, 0x1f, 0x44, 0, 0], Execution::Emulated),      // nopl 0x0(%rax,%rax,1)
            (&[0x48, 0x83, 0xec, 0x18], Execution::SingleStepped), // sub $0x18,%rsp
            (&[0xf3, 0x0f, 0x1e, 0xfa], Execution::SingleStepped), // endbr64
            (&[0xff, 0xd0], Execution::SingleStepped),             // call *%rax
            (&[0x74, 0x05], Execution::Emulated),                  // je
        ];
        for (code, expected) in cases {
            assert_eq!(execution(code, 0x1000), Some(expected), "{code:02x?}");
        }
        assert_eq!(execution(&[0x0f], 0x1000), None, "a cut instruction");
    }

    #[test]
    fn a_go_entry_is_probed_at_the_jump_of_its_stack_check_when_the_arguments_survive() {
        // cmp %rsp,0x10(%r14); jbe; sub $0x68,%rsp (Go 1.19 crypto/tls.(*Conn).Read)
        let small_frame = [
            0x49, 0x3b, 0x66, 0x10, 0x0f, 0x86, 0xc2, 0x03, 0, 0, 0x48, 0x83, 0xec, 0x68,
        ];
        // lea -0x68(%rsp),%r12; cmp %r12,0x10(%r14); jbe (a bigger frame: `Write`)
        let big_frame = [
            0x4c, 0x8d, 0x64, 0x24, 0x98, 0x4d, 0x3b, 0x66, 0x10, 0x0f, 0x86, 0x64, 0x07, 0, 0,
        ];
        // mov %rsp,%r12; sub $0x2000,%r12; jb; cmp %r12,0x10(%r14); jbe (a frame over 4 KiB)
        let huge_frame = [
            0x49, 0x89, 0xe4, 0x49, 0x81, 0xec, 0x00, 0x20, 0, 0, 0x72, 0x10, 0x4d, 0x3b, 0x66,
            0x10, 0x0f, 0x86, 0x40, 0, 0, 0,
        ];
        let arguments = [Register::RAX, Register::RBX, Register::RCX, Register::R14];
        assert_eq!(
            go_stack_check_jump(&small_frame, 0x1000, &arguments),
            Some(4)
        );
        assert_eq!(go_stack_check_jump(&big_frame, 0x1000, &arguments), Some(9));
        assert_eq!(
            go_stack_check_jump(&huge_frame, 0x1000, &arguments),
            Some(16)
        );
        assert_eq!(
            go_stack_check_jump(&big_frame, 0x1000, &[Register::R12]),
            None,
            "r12 is written first"
        );
        assert_eq!(
            go_stack_check_jump(&[0x55, 0xc3], 0, &arguments),
            None,
            "no stack check"
        );
        assert_eq!(
            go_stack_check_jump(&[0xc3], 0, &arguments),
            None,
            "returns first"
        );
    }

    #[test]
    fn every_ret_is_found_only_when_the_whole_function_decodes() {
        // xor %ecx,%ecx; ret; mov 0x60(%rsp),%rbp; ret; int3 padding
        let function = [
            0x31, 0xc9, 0xc3, 0x48, 0x8b, 0x6c, 0x24, 0x60, 0xc3, 0xcc, 0xcc,
        ];
        assert_eq!(returns(&function, 0x1000), Some(vec![2, 8]));
        assert_eq!(
            returns(&function[..7], 0x1000),
            None,
            "cut inside an instruction"
        );
        assert_eq!(returns(&[0x31, 0xc9], 0x1000), None, "no ret");
    }

    #[test]
    fn a_spilled_argument_is_found_only_where_nothing_else_can_move_or_overwrite_it() {
        const CHECK: [u8; 10] = [0x49, 0x3b, 0x66, 0x10, 0x0f, 0x86, 0, 0, 0, 0]; // cmp; jbe
        const SPILL_RAX: [u8; 5] = [0x48, 0x89, 0x44, 0x24, 0x70]; // mov %rax,0x70(%rsp)
        const CALL: [u8; 5] = [0xe8, 0, 0, 0, 0];
        const EPILOGUE: [u8; 5] = [0x48, 0x83, 0xc4, 0x68, 0xc3]; // add $0x68,%rsp; ret
        let function = |parts: &[&[u8]]| parts.concat();
        let go119 = function(&[
            &CHECK,
            &[0x48, 0x83, 0xec, 0x68],
            &SPILL_RAX,
            &CALL,
            &EPILOGUE,
        ]);
        assert_eq!(
            spilled_argument_slot(&go119, 0x1000, Register::RAX),
            Some(0x70)
        );
        assert_eq!(
            spilled_argument_slot(&go119, 0x1000, Register::RBX),
            None,
            "not spilled"
        );
        // Go 1.21+: push %rbp; mov %rsp,%rbp; sub $0x60,%rsp.
        let go121 = function(&[
            &CHECK,
            &[0x55, 0x48, 0x89, 0xe5, 0x48, 0x83, 0xec, 0x60],
            &SPILL_RAX,
            &CALL,
        ]);
        assert_eq!(
            spilled_argument_slot(&go121, 0x1000, Register::RAX),
            Some(0x70)
        );
        let overwritten = function(&[
            &go119[..go119.len() - 5],
            &[0x48, 0x89, 0x5c, 0x24, 0x70],
            &EPILOGUE,
        ]);
        assert_eq!(
            spilled_argument_slot(&overwritten, 0x1000, Register::RAX),
            None
        );
        let moved = function(&[
            &go119[..go119.len() - 5],
            &[0x48, 0x83, 0xec, 0x08],
            &EPILOGUE,
        ]);
        assert_eq!(
            spilled_argument_slot(&moved, 0x1000, Register::RAX),
            None,
            "sub rsp later"
        );
        let clobbered = function(&[
            &CHECK,
            &[0x48, 0x83, 0xec, 0x68, 0x31, 0xc0],
            &SPILL_RAX,
            &CALL,
        ]);
        assert_eq!(
            spilled_argument_slot(&clobbered, 0x1000, Register::RAX),
            None,
            "rax changed"
        );
    }

    #[test]
    fn a_call_site_is_found_when_the_target_is_called_exactly_once() {
        // call 0x2000; call 0x3000; call 0x3000; ret
        let code = [
            0xe8, 0xfb, 0x0f, 0, 0, 0xe8, 0xf6, 0x1f, 0, 0, 0xe8, 0xf1, 0x1f, 0, 0, 0xc3,
        ];
        assert_eq!(only_call_to(&code, 0x1000, 0x2000), Some(0));
        assert_eq!(only_call_to(&code, 0x1000, 0x3000), None, "called twice");
        assert_eq!(only_call_to(&code, 0x1000, 0x4000), None, "never called");
        assert_eq!(only_call_to(&code[..7], 0x1000, 0x2000), None, "cut");
    }

    #[test]
    fn the_first_call_is_found_past_error_checks_with_what_was_written_before() {
        let call = first_call(SSL_READ, SSL_READ_AT).unwrap();
        assert_eq!((call.target, call.offset), (READ_INTERNAL_AT, 30));
        assert!(call.preserves(&[Register::RDI, Register::RSI]));
        assert!(!call.preserves(&[Register::RCX]), "rcx points at a local");
        assert!(!call.preserves(&[Register::RDX]), "num was sign-extended");
        let ex = first_call(SSL_READ_EX, SSL_READ_EX_AT).unwrap();
        assert_eq!(ex.target, READ_INTERNAL_AT);
        assert!(ex.preserves(&[Register::RDI, Register::RSI, Register::RDX, Register::RCX]));
        assert_eq!(
            execution(READ_INTERNAL, READ_INTERNAL_AT),
            Some(Execution::Emulated)
        );
        // A path that returns, or calls through a register, has no first call to trust.
        assert_eq!(first_call(&[0x31, 0xc0, 0xc3], 0), None);
        assert_eq!(first_call(&[0xff, 0xd0], 0), None);
    }
}
