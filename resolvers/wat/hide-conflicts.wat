;; A resolver written by hand in WebAssembly text, to show ABI v1 with nothing hidden.
;; It answers {"deleted":true}: under this resolver, a record whose versions conflict reads as
;; deleted until someone writes it again (a "conflicts need a human" policy), and it logs a line.
(module
  (import "locus" "log" (func $log (param i32 i32)))
  (memory (export "memory") 1)
  (data (i32.const 16) "{\"deleted\":true}")
  (data (i32.const 64) "conflict: record hidden until rewritten")
  ;; Inputs go at 1024; one page (64 KiB) holds small inputs, and the memory grows for larger ones.
  (func (export "locus_alloc") (param $len i32) (result i32)
    (local $needed i32)
    (local.set $needed (i32.add (i32.const 1024) (local.get $len)))
    (block $enough
      (br_if $enough (i32.le_u (local.get $needed) (i32.mul (memory.size) (i32.const 65536))))
      (drop (memory.grow (i32.sub
        (i32.div_u (i32.add (local.get $needed) (i32.const 65535)) (i32.const 65536))
        (memory.size)))))
    (i32.const 1024))
  (func (export "locus_resolve") (param $ptr i32) (param $len i32) (result i64)
    (call $log (i32.const 64) (i32.const 39))
    ;; (out_ptr << 32) | out_len
    (i64.or (i64.shl (i64.const 16) (i64.const 32)) (i64.const 16))))
