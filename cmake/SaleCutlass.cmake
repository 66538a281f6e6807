# Header-only CUTLASS/CuTe target sale::cutlass. The headers come from the
# nvidia-cutlass wheel (cutlass_library/source/include) unless
# SALE_CUTLASS_INCLUDE_DIR is given.

if(NOT SALE_CUTLASS_INCLUDE_DIR)
  find_package(Python COMPONENTS Interpreter REQUIRED)
  # find_spec: locate the package without importing (running) it.
  execute_process(
    COMMAND "${Python_EXECUTABLE}" -c
      "import importlib.util as u, os; s = u.find_spec('cutlass_library'); print(os.path.join(os.path.dirname(s.origin), 'source', 'include') if s else '')"
    OUTPUT_VARIABLE _sale_cutlass_inc OUTPUT_STRIP_TRAILING_WHITESPACE
    ERROR_QUIET)
  # FORCE: replace an empty value cached by an earlier failed configure.
  set(SALE_CUTLASS_INCLUDE_DIR "${_sale_cutlass_inc}" CACHE PATH
    "CUTLASS include dir (containing cute/ and cutlass/)" FORCE)
endif()

if(NOT EXISTS "${SALE_CUTLASS_INCLUDE_DIR}/cute/tensor.hpp")
  message(FATAL_ERROR
    "sale_ops: CUTLASS headers not found (no cute/tensor.hpp in '${SALE_CUTLASS_INCLUDE_DIR}').\n"
    "Run `pip install nvidia-cutlass==4.2.0.0` or set -DSALE_CUTLASS_INCLUDE_DIR=<cutlass>/include "
    "(pip: -Ccmake.define.SALE_CUTLASS_INCLUDE_DIR=...).")
endif()

file(STRINGS "${SALE_CUTLASS_INCLUDE_DIR}/cutlass/version.h" _sale_v
  REGEX "^#define CUTLASS_(MAJOR|MINOR|PATCH) ")
string(REGEX REPLACE ".*CUTLASS_MAJOR ([0-9]+).*" "\\1" _maj "${_sale_v}")
string(REGEX REPLACE ".*CUTLASS_MINOR ([0-9]+).*" "\\1" _min "${_sale_v}")
string(REGEX REPLACE ".*CUTLASS_PATCH ([0-9]+).*" "\\1" _pat "${_sale_v}")
set(SALE_CUTLASS_VERSION "${_maj}.${_min}.${_pat}")
message(STATUS "sale_ops: CUTLASS ${SALE_CUTLASS_VERSION} at ${SALE_CUTLASS_INCLUDE_DIR}")

add_library(sale_cutlass INTERFACE)
add_library(sale::cutlass ALIAS sale_cutlass)
target_include_directories(sale_cutlass SYSTEM INTERFACE "${SALE_CUTLASS_INCLUDE_DIR}")
