"""hat-bpu's one compiled piece: the conv requantization epilogue (hat_bpu/_native.c).

Optional: where no C compiler is at hand the build goes on without it and hat_bpu.native
falls back to the torch passes (same values, slower)."""

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


class BuildExt(build_ext):
    """-O3 and no floating-point contraction (bit-identical results need each double
    operation rounded on its own) where the compiler takes GCC/Clang flags."""

    def build_extensions(self) -> None:
        if self.compiler.compiler_type == "msvc":
            flags = ["/O2", "/fp:precise"]
        else:
            flags = ["-O3", "-ffp-contract=off", "-fno-math-errno"]
        for ext in self.extensions:
            ext.extra_compile_args = flags
        super().build_extensions()


setup(ext_modules=[Extension("hat_bpu._native", ["hat_bpu/_native.c"], optional=True)],
      cmdclass={"build_ext": BuildExt})
