"""cffi build script (API mode): compiles native/*.c into ``pytest_incarnate._native``.

Used by setup.py through ``cffi_modules``; run it directly to build in place:
``python native/build_ffi.py``.  Set ``INCARNATE_SANITIZE=1`` to build with
AddressSanitizer and UndefinedBehaviorSanitizer.
"""

import os
import re
from pathlib import Path

from cffi import FFI

HERE = Path(__file__).resolve().parent


def _cdef_from_header(text: str) -> str:
    """The declarations cffi needs, taken from incarnate.h itself (one source of truth)."""
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    out = []
    for line in text.splitlines():
        s = line.strip()
        if s.startswith("#define INC_"):
            name = s.split()[1]
            out.append(f"#define {name} ...")
        elif s.startswith("#") or not s:
            continue
        else:
            out.append(line)
    return "\n".join(out)


ffibuilder = FFI()
ffibuilder.cdef(_cdef_from_header((HERE / "incarnate.h").read_text()))

_extra_compile = ["-std=gnu11", "-O2", "-Wall", "-Wextra", "-Wno-unused-parameter"]
_extra_link: list[str] = []
if os.environ.get("INCARNATE_SANITIZE"):
    _extra_compile += ["-fsanitize=address,undefined", "-fno-omit-frame-pointer"]
    _extra_link += ["-fsanitize=address,undefined"]

# Direct enter's entry point, called through ctypes.PyDLL (the GIL held, no bytecode between
# the steps): the interpreter's fork protocol around the core call, as os.fork has it.  Not
# in the cdef: cffi would release the GIL around it.
_DIRECT_WRAPPER = r"""
#include "incarnate.h"

/* Hidden by the limited API that cffi builds with; exported by every CPython 3.8+. */
extern void PyOS_BeforeFork(void);
extern void PyOS_AfterFork_Parent(void);
extern void PyOS_AfterFork_Child(void);
extern int PySys_Audit(const char *event, const char *format, ...);

int inc_enter_direct_py(const struct inc_spec *spec, struct inc_result *res, void *mem)
{
    if (PySys_Audit("os.fork", NULL) < 0)
        return -3;   /* the audit hook's exception is set: ctypes raises it */
    PyOS_BeforeFork();
    int rc = inc_enter_direct(spec, res, mem);
    if (rc == 1)
        PyOS_AfterFork_Child();   /* clears the signals the copy inherited as pending */
    else
        PyOS_AfterFork_Parent();
    return rc;
}
"""

ffibuilder.set_source(
    "pytest_incarnate._native",
    _DIRECT_WRAPPER,
    sources=[os.path.relpath(HERE / "incarnate.c")],
    include_dirs=[os.path.relpath(HERE)],
    extra_compile_args=_extra_compile,
    extra_link_args=_extra_link,
)

if __name__ == "__main__":
    os.chdir(HERE.parent)
    ffibuilder.compile(tmpdir=".", verbose=True)
