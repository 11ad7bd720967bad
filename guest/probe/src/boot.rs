//! From the PVH entry to ring 3, for the boot CPU and for every AP.
//!
//! Ring-0 code is emulated instruction by instruction on the nested KVM this
//! project runs on (~1 M instructions/s), so this part is a short straight
//! line of assembly: static page tables (identity map of the first 4 GiB in
//! 2 MiB user-accessible pages), a static GDT, this CPU's TSS, the IDT
//! pointer, then `iretq` to ring 3 with IOPL=3 and interrupts off. Everything
//! else, the IDT's contents included, is done in ring 3 at native speed.
//!
//! CPU index 0 is the boot CPU (entered at `pvh_start` by the VMM); APs come
//! through the real-mode trampoline (copied below 1 MiB by `smp`) with their
//! index in `AP_BOOT_INDEX`.

use core::arch::global_asm;
use core::sync::atomic::AtomicU32;

use oxvirt_probe::MAX_CPUS;

const STACK0_SIZE: usize = 8 * 1024;
const BSP_STACK3_SIZE: usize = 256 * 1024;
const AP_STACK3_SIZE: usize = 16 * 1024;
const TSS_STRIDE: usize = 128;
/// GDT selectors (see `gdt` below).
pub const KERNEL_CODE32: u16 = 0x18;
const FIRST_TSS_SELECTOR: usize = 0x30;

/// The index the next AP takes; `smp` sets it before sending the SIPI.
pub static AP_BOOT_INDEX: AtomicU32 = AtomicU32::new(0);

extern "C" {
    static boot_info_paddr: u64;
    static ap_trampoline_start: u8;
    static ap_trampoline_end: u8;
    static exception_stubs: [u64; 32];
    static mut idt: [u64; 64];
}

/// Physical address of the `hvm_start_info` the PVH loader passed in %ebx.
pub fn start_info_paddr() -> u64 {
    // SAFETY: written once by `pvh_start` before ring 3 is entered, read-only after.
    unsafe { core::ptr::addr_of!(boot_info_paddr).read_volatile() }
}

/// The real-mode AP start-up code, to be copied to a page below 1 MiB.
pub fn ap_trampoline() -> &'static [u8] {
    // SAFETY: both symbols delimit the trampoline blob in .rodata (see the asm).
    unsafe {
        let start = core::ptr::addr_of!(ap_trampoline_start);
        let end = core::ptr::addr_of!(ap_trampoline_end);
        core::slice::from_raw_parts(start, end as usize - start as usize)
    }
}

/// Fills the IDT (loaded, still empty, by the ring-0 code) with interrupt
/// gates for the 32 CPU exceptions. The identity map is user-accessible, so
/// ring 3 can write the table; the CPU reads it only when an exception hits.
pub fn install_exception_handlers() {
    const KERNEL_CODE64: u64 = 0x08;
    const INTERRUPT_GATE_PRESENT: u64 = 0x8e00;
    // SAFETY: `exception_stubs` is a static table of 32 handler addresses.
    let stubs = unsafe { &*core::ptr::addr_of!(exception_stubs) };
    let idt_ptr = core::ptr::addr_of_mut!(idt) as *mut u64;
    for (vector, &handler) in stubs.iter().enumerate() {
        let low = (handler & 0xffff)
            | (KERNEL_CODE64 << 16)
            | (INTERRUPT_GATE_PRESENT << 32)
            | ((handler >> 16) & 0xffff) << 48;
        // SAFETY: `idt` is this guest's table of 32 16-byte gates; the CPU
        // reads it only when an exception hits, and nothing else writes it.
        unsafe {
            idt_ptr.add(2 * vector).write_volatile(low);
            idt_ptr.add(2 * vector + 1).write_volatile(handler >> 32);
        }
    }
}

/// What the CPU and the stub pushed when an exception hit.
#[repr(C)]
pub struct ExceptionFrame {
    pub vector: u64,
    pub error_code: u64,
    pub rip: u64,
    pub cs: u64,
    pub rflags: u64,
    pub rsp: u64,
    pub ss: u64,
}

global_asm!(
    r#"
    /* The PVH entry note: Xen ELF note type 18 (XEN_ELFNOTE_PHYS32_ENTRY).
       The address is 8 bytes: QEMU 7.2 reads a full 64-bit word. */
    .section .note.Xen, "a", @note
    .balign 4
    .long 4, 8, 18
    .asciz "Xen"
    .balign 4
    .quad pvh_start

    .section .text.boot, "ax"
    .code32
    .globl pvh_start
pvh_start:                          /* 32-bit, paging off, %ebx = hvm_start_info */
    cli
    cld
    movl %ebx, boot_info_paddr
    xorl %edi, %edi
    jmp enter_long_mode

    .globl ap_protected_entry
ap_protected_entry:                 /* from the trampoline: 32-bit flat, paging off */
    movl $0x10, %eax
    movl %eax, %ds
    movl %eax, %es
    movl %eax, %ss
    movl {ap_index}, %edi

enter_long_mode:                    /* %edi = CPU index */
    movl $pml4, %eax
    movl %eax, %cr3
    movl %cr4, %eax
    orl $0x620, %eax                /* PAE | OSFXSR | OSXMMEXCPT */
    movl %eax, %cr4
    movl $0xc0000080, %ecx          /* EFER.LME */
    rdmsr
    orl $0x100, %eax
    wrmsr
    movl %cr0, %eax
    andl $0xfffffffb, %eax          /* clear EM: SSE on */
    orl $0x80000023, %eax           /* PG | NE | MP | PE */
    movl %eax, %cr0
    lgdt gdt_ptr
    ljmp $0x08, $long_mode_entry

    .code64
long_mode_entry:
    movl $0x10, %eax
    movl %eax, %ds
    movl %eax, %es
    movl %eax, %ss
    xorl %eax, %eax
    movl %eax, %fs
    movl %eax, %gs
    lidt idt_ptr(%rip)

    /* Ring-0 stack of CPU i: the top of slot i. */
    leaq 1(%rdi), %rax
    imulq ${stack0}, %rax
    leaq stacks0(%rip), %rsp
    addq %rax, %rsp

    /* TSS of CPU i: rsp0, and the shared all-zero I/O bitmap after the
       TSS array. IOPL=3 already allows every port, but PVM (the nested KVM
       of these machines) checks the TSS bitmap instead of IOPL. */
    movq %rdi, %rbx
    imulq ${tss_stride}, %rbx
    leaq tss_array(%rip), %rax
    addq %rax, %rbx
    movq %rsp, 4(%rbx)
    movl ${max_cpus}, %edx
    subl %edi, %edx
    imull ${tss_stride}, %edx       /* bitmap offset from this TSS */
    movw %dx, 102(%rbx)

    /* Its 16-byte descriptor in the GDT: type 0x89, base %rbx, limit
       covering the 8 KiB bitmap and its 0xff terminator byte. */
    movq %rdi, %rsi
    shlq $4, %rsi
    leaq gdt_tss(%rip), %rax
    addq %rax, %rsi
    leal 8192(%rdx), %eax
    movl %ebx, %ecx
    andl $0xffffff, %ecx
    shlq $16, %rcx
    orq %rcx, %rax
    movabsq $0x890000000000, %rcx
    orq %rcx, %rax
    movq %rbx, %rcx
    shrq $24, %rcx
    andq $0xff, %rcx
    shlq $56, %rcx
    orq %rcx, %rax
    movq %rax, (%rsi)
    movq %rbx, %rax
    shrq $32, %rax
    movq %rax, 8(%rsi)
    movl %edi, %eax
    shll $4, %eax
    addl ${first_tss}, %eax
    ltr %ax

    /* Ring-3 stack: the boot CPU's own, or AP slot i-1. */
    testl %edi, %edi
    jnz 1f
    leaq bsp_stack3_top(%rip), %rax
    jmp 2f
1:  movq %rdi, %rax
    imulq ${ap_stack3}, %rax
    leaq ap_stacks3(%rip), %rcx     /* top of slot i-1 = base + i * size */
    addq %rcx, %rax
2:  subq $8, %rax                   /* rsp % 16 == 8, as right after a call */
    pushq $0x23                     /* SS: user data */
    pushq %rax                      /* RSP */
    pushq $0x3002                   /* RFLAGS: IOPL=3, IF=0 */
    pushq $0x2b                     /* CS: user code 64 */
    leaq ring3_start(%rip), %rax
    pushq %rax
    iretq

ring3_start:                        /* ring 3, native speed; %rdi = CPU index */
    testq %rdi, %rdi
    jnz 3f
    leaq __bss_start(%rip), %rdi    /* the boot CPU zeroes .bss (a reset may leave data) */
    leaq __bss_end(%rip), %rcx
    subq %rdi, %rcx
    xorl %eax, %eax
    rep stosb
    xorl %edi, %edi
3:  jmp {ring3_entry}

    /* CPU exceptions: a ring-0 stub per vector, then the Rust reporter. */
    .macro exception_stub n, has_error
exception_stub_\n:
    .if \has_error == 0
    pushq $0
    .endif
    pushq $\n
    jmp exception_common
    .endm
    .irp n, 0,1,2,3,4,5,6,7,9,15,16,18,19,20,22,23,24,25,26,27,28,31
    exception_stub \n, 0
    .endr
    .irp n, 8,10,11,12,13,14,17,21,29,30
    exception_stub \n, 1
    .endr
exception_common:
    movq %rsp, %rdi
    andq $-16, %rsp
    call {exception}
    ud2

    .section .rodata.exception_stubs, "a"
    .balign 8
    .globl exception_stubs
exception_stubs:
    .irp n, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
    .quad exception_stub_\n
    .endr

    /* AP start-up: real mode at (SIPI vector << 12), copied there by `smp`.
       Position-independent: it only addresses itself through %cs. */
    .section .rodata.ap_trampoline, "a"
    .balign 16
    .globl ap_trampoline_start, ap_trampoline_end
    .code16
ap_trampoline_start:
    cli
    cld
    lgdtl %cs:(ap_trampoline_gdtr - ap_trampoline_start)
    movl %cr0, %eax
    orl $1, %eax
    movl %eax, %cr0
    ljmpl ${code32}, $ap_protected_entry
    .balign 8
ap_trampoline_gdtr:
    .word gdt_end - gdt - 1
    .long gdt
ap_trampoline_end:
    .code64

    .section .data.pagetables, "aw"
    .balign 4096
pml4:
    .quad pdpt + 0x7
    .fill 511, 8, 0
pdpt:
    .quad pd + 0x7, pd + 0x1007, pd + 0x2007, pd + 0x3007
    .fill 508, 8, 0
pd:                                 /* 2048 x 2 MiB: present, writable, user, large */
    .set page, 0
    .rept 2048
    .quad (page << 21) | 0x87
    .set page, page + 1
    .endr

    .section .data.boot, "aw"
    .balign 16
gdt:
    .quad 0
    .quad 0x00af9a000000ffff        /* 0x08 kernel code 64 */
    .quad 0x00cf92000000ffff        /* 0x10 kernel data */
    .quad 0x00cf9a000000ffff        /* 0x18 kernel code 32 (AP trampoline) */
    .quad 0x00cff2000000ffff        /* 0x20 user data */
    .quad 0x00affa000000ffff        /* 0x28 user code 64 */
gdt_tss:                            /* 0x30 + 16 * i: TSS of CPU i */
    .fill {max_cpus} * 2, 8, 0
gdt_end:
    .balign 8
gdt_ptr:
    .word gdt_end - gdt - 1
    .quad gdt
    .balign 8
idt_ptr:
    .word 32 * 16 - 1
    .quad idt
    .balign 16
    .globl idt
idt:
    .fill 64, 8, 0
    .balign 8
    .globl boot_info_paddr
boot_info_paddr:
    .quad 0
    .balign 16
tss_array:
    .fill {max_cpus} * {tss_stride}, 1, 0
io_bitmap:                          /* every port allowed */
    .fill 8192, 1, 0
    .byte 0xff

    .section .stacks, "aw", @nobits
    .balign 4096
stacks0:
    .skip {max_cpus} * {stack0}
ap_stacks3:
    .skip ({max_cpus} - 1) * {ap_stack3}
    .balign 16
    .skip {bsp_stack3}
bsp_stack3_top:

    .text
"#,
    ap_index = sym AP_BOOT_INDEX,
    ring3_entry = sym crate::ring3_entry,
    exception = sym crate::rt::exception::report,
    stack0 = const STACK0_SIZE,
    ap_stack3 = const AP_STACK3_SIZE,
    bsp_stack3 = const BSP_STACK3_SIZE,
    tss_stride = const TSS_STRIDE,
    first_tss = const FIRST_TSS_SELECTOR,
    code32 = const KERNEL_CODE32,
    max_cpus = const MAX_CPUS,
    options(att_syntax)
);
