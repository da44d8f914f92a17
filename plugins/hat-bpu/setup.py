"""hat-bpu's one compiled piece: the conv requantization epilogue (hat_bpu/_native.c).

Optional: where no C compiler is at hand the build goes on without it and hat_bpu.native
falls back to the torch passes (same values, slower). With OpenMP where the compiler has it
(the passes then run in the OpenMP runtime torch has loaded, on its threads); without it where
it has not (one thread)."""

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


class BuildExt(build_ext):
    """-O3 and no floating-point contraction (bit-identical results need each double
    operation rounded on its own) where the compiler takes GCC/Clang flags; -fopenmp when it
    builds with it, else the same without."""

    def build_extensions(self) -> None:
        if self.compiler.compiler_type == "msvc":
            flags, omp = ["/O2", "/fp:precise"], []
        else:
            flags, omp = ["-O3", "-ffp-contract=off", "-fno-math-errno"], ["-fopenmp"]
        for ext in self.extensions:
            ext.extra_compile_args, ext.extra_link_args = flags + omp, omp
        try:
            super().build_extensions()
        except Exception as exc:  # noqa: BLE001  (no OpenMP: build it single-threaded)
            if not omp:
                raise
            print(f"hat-bpu: building without OpenMP ({type(exc).__name__}: {exc})")
            for ext in self.extensions:
                ext.extra_compile_args, ext.extra_link_args = flags, []
            super().build_extensions()


setup(ext_modules=[Extension("hat_bpu._native", ["hat_bpu/_native.c"], optional=True)],
      cmdclass={"build_ext": BuildExt})
