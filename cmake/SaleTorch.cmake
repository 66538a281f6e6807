# LibTorch stable-ABI target sale::torch_stable, located through the Python
# interpreter (scikit-build-core passes Python_EXECUTABLE). find_package(Torch)
# is deliberately not used: its Caffe2 CUDA detection (nvrtc, cuDNN, ...) is
# brittle and we need none of it.

find_package(Python COMPONENTS Interpreter REQUIRED)
execute_process(
  COMMAND "${Python_EXECUTABLE}" -c
    "import torch; print(torch.utils.cmake_prefix_path, torch.__version__, torch.version.cuda, sep=';')"
  OUTPUT_VARIABLE _sale_torch OUTPUT_STRIP_TRAILING_WHITESPACE
  RESULT_VARIABLE _sale_rc ERROR_VARIABLE _sale_err)
if(NOT _sale_rc EQUAL 0)
  message(FATAL_ERROR "sale_ops: cannot import torch with ${Python_EXECUTABLE}:\n${_sale_err}\n"
    "Install torch>=2.10 first and build with `pip install --no-build-isolation -e .`")
endif()
list(GET _sale_torch 0 _sale_torch_cmake)
list(GET _sale_torch 1 SALE_TORCH_VERSION)
list(GET _sale_torch 2 SALE_TORCH_CUDA_VERSION)
# cmake_prefix_path is <torch>/share/cmake
get_filename_component(SALE_TORCH_ROOT "${_sale_torch_cmake}/../.." REALPATH)
set(SALE_TORCH_INCLUDE_DIR "${SALE_TORCH_ROOT}/include")
set(SALE_TORCH_LIB_DIR "${SALE_TORCH_ROOT}/lib")
message(STATUS "sale_ops: torch ${SALE_TORCH_VERSION} (CUDA ${SALE_TORCH_CUDA_VERSION}) at ${SALE_TORCH_ROOT}")

if(SALE_TORCH_CUDA_VERSION STREQUAL "None")
  message(FATAL_ERROR "sale_ops: torch ${SALE_TORCH_VERSION} is a CPU-only build; a CUDA build is required.")
endif()
if(NOT EXISTS "${SALE_TORCH_INCLUDE_DIR}/torch/csrc/stable/library.h")
  message(FATAL_ERROR "sale_ops: ${SALE_TORCH_INCLUDE_DIR}/torch/csrc/stable/library.h not found (need torch>=2.10).")
endif()
set(_sale_torch_libs)
foreach(_lib torch_cpu torch_cuda c10)
  set(_path "${SALE_TORCH_LIB_DIR}/lib${_lib}.so")
  if(NOT EXISTS "${_path}")
    message(FATAL_ERROR "sale_ops: ${_path} not found")
  endif()
  list(APPEND _sale_torch_libs "${_path}")
endforeach()

add_library(sale::torch_stable INTERFACE IMPORTED)
target_include_directories(sale::torch_stable INTERFACE "${SALE_TORCH_INCLUDE_DIR}")
target_compile_definitions(sale::torch_stable INTERFACE
  TORCH_TARGET_VERSION=0x020a000000000000   # stable ABI of torch 2.10: runs on 2.10+
  USE_CUDA)                                 # declares the CUDA stream shims
target_link_libraries(sale::torch_stable INTERFACE ${_sale_torch_libs})
