"""Build the compiled core `edmrt._core` (C++17, pybind11); everything else is in pyproject.toml."""
from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import setup

core = Pybind11Extension(
    "edmrt._core",
    sources=["cpp/philox.cpp", "cpp/step.cpp", "cpp/plan_json.cpp", "cpp/capi.cpp", "cpp/bindings.cpp"],
    depends=["cpp/step_update.inc", "cpp/include/edmrt_core.hpp", "cpp/include/edmrt.h"],
    include_dirs=["cpp/include"],
    cxx_std=17,
    extra_compile_args=["-O3", "-Wall", "-Wextra", "-fopenmp"],
    extra_link_args=["-fopenmp"],
)

setup(ext_modules=[core], cmdclass={"build_ext": build_ext})
