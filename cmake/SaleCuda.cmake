# CUDA compiler / toolkit discovery and CUDA compile flags.
#
# include(SaleCuda) BEFORE project(): chooses CMAKE_CUDA_COMPILER and
# CMAKE_CUDA_ARCHITECTURES. Call sale_cuda_setup() AFTER project(): defines
# the interface target sale::cuda_flags and finds CUDA::cudart.

set(SALE_CUDA_ARCHS "$ENV{SALE_CUDA_ARCHS}" CACHE STRING
  "CUDA architectures, CMake spelling (e.g. 90a or 80;86;89;90a)")
if(SALE_CUDA_ARCHS STREQUAL "")
  set_property(CACHE SALE_CUDA_ARCHS PROPERTY VALUE "90a")
endif()
# Arch-specific targets (90a, 100a, ...) get SASS only ("-real"): their PTX
# cannot be JIT-compiled for any other GPU, so embedding it only adds size.
# (Use an explicit "90a-virtual" entry if PTX is ever wanted.)
# Plain entries (80, 86, ...) keep CMake's default of SASS + PTX.
set(CMAKE_CUDA_ARCHITECTURES "")
foreach(_arch IN LISTS SALE_CUDA_ARCHS)
  if(_arch MATCHES "^[0-9]+a$")
    set(_arch "${_arch}-real")
  endif()
  list(APPEND CMAKE_CUDA_ARCHITECTURES "${_arch}")
endforeach()

# Returns the real toolkit root of an nvcc, which may be a symlink or a shell
# wrapper (e.g. /usr/local/bin/nvcc doing `exec /usr/local/cuda-13.0/bin/nvcc`).
# nvcc --dryrun prints `#$ _HERE_=<dir of the real nvcc binary>`.
function(_sale_nvcc_root nvcc out_var)
  execute_process(
    COMMAND "${nvcc}" --dryrun -c -x cu /dev/null -o /dev/null
    OUTPUT_VARIABLE _out ERROR_VARIABLE _out RESULT_VARIABLE _rc)
  if(_rc EQUAL 0 AND _out MATCHES "#\\$ _HERE_=([^\r\n]+)")
    get_filename_component(_root "${CMAKE_MATCH_1}/.." REALPATH)
  else()
    get_filename_component(_root "${nvcc}" REALPATH)
    get_filename_component(_root "${_root}/../.." REALPATH)
  endif()
  set(${out_var} "${_root}" PARENT_SCOPE)
endfunction()

if(NOT CMAKE_CUDA_COMPILER)
  if(NOT CUDAToolkit_ROOT AND NOT "$ENV{CUDAToolkit_ROOT}" STREQUAL "")
    set(CUDAToolkit_ROOT "$ENV{CUDAToolkit_ROOT}")
  endif()
  if(NOT "$ENV{CUDA_HOME}" STREQUAL "" AND EXISTS "$ENV{CUDA_HOME}/bin/nvcc")
    set(_sale_root "$ENV{CUDA_HOME}")
  elseif(CUDAToolkit_ROOT AND EXISTS "${CUDAToolkit_ROOT}/bin/nvcc")
    set(_sale_root "${CUDAToolkit_ROOT}")
  else()
    if(NOT "$ENV{CUDACXX}" STREQUAL "")
      set(_sale_nvcc "$ENV{CUDACXX}")
    else()
      find_program(_sale_nvcc nvcc HINTS /usr/local/cuda/bin NO_CACHE)
    endif()
    if(_sale_nvcc)
      _sale_nvcc_root("${_sale_nvcc}" _sale_root)
    endif()
  endif()
  if(_sale_root)
    get_filename_component(_sale_root "${_sale_root}" REALPATH)
    set(CMAKE_CUDA_COMPILER "${_sale_root}/bin/nvcc" CACHE FILEPATH "CUDA compiler")
    set(CUDAToolkit_ROOT "${_sale_root}" CACHE PATH "CUDA toolkit root")
  endif()
  # else: let project() fail with CMake's own "No CMAKE_CUDA_COMPILER" error.
endif()

find_program(SALE_CCACHE ccache)
if(SALE_CCACHE)
  foreach(_lang CXX CUDA)
    if(NOT CMAKE_${_lang}_COMPILER_LAUNCHER)
      set(CMAKE_${_lang}_COMPILER_LAUNCHER "${SALE_CCACHE}")
    endif()
  endforeach()
endif()

function(sale_cuda_setup)
  find_package(CUDAToolkit REQUIRED)
  message(STATUS "sale_ops: nvcc ${CMAKE_CUDA_COMPILER_VERSION} (${CMAKE_CUDA_COMPILER}), "
                 "toolkit ${CUDAToolkit_LIBRARY_ROOT}")
  message(STATUS "sale_ops: CUDA architectures: ${CMAKE_CUDA_ARCHITECTURES}")
  if(SALE_CCACHE)
    message(STATUS "sale_ops: using ccache ${SALE_CCACHE}")
  endif()

  add_library(sale_cuda_flags INTERFACE)
  add_library(sale::cuda_flags ALIAS sale_cuda_flags)
  # CUTLASS 4.2 and the stable-ABI headers need C++17 (both also build as
  # C++20, the standard torch itself uses).
  target_compile_features(sale_cuda_flags INTERFACE cxx_std_17 cuda_std_17)
  target_compile_options(sale_cuda_flags INTERFACE
    "$<$<COMPILE_LANGUAGE:CUDA>:-O3;--expt-relaxed-constexpr;--expt-extended-lambda;-lineinfo>")
endfunction()
